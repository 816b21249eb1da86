"""The built-in demo model: coloured shapes on plain backgrounds, trained with pixart's own training code."""
from pathlib import Path

NAME = "demo"  # reserved model name: `from_pretrained("demo")`, `--model demo` (a local folder of that name: ./demo)
MODEL = Path(__file__).resolve().parent / "model"  # the shipped diffusers pipeline folder
