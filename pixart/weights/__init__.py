"""Reading checkpoint files, mapping their keys, and resolving Hub ids."""
