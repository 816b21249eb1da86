"""Default torch threads: the cores this process may use, shared among the torchrun processes of one machine."""
from __future__ import annotations

import pytest
import torch

from pixart.cli import build_parser
from pixart.hardware import default_threads, set_threads


@pytest.mark.parametrize("cores, processes, expected", [
    (2, 1, 2),    # a plain run uses every core it may run on
    (16, 4, 4),   # 4 torchrun ranks on one machine: a quarter each
    (10, 4, 2),   # an uneven split rounds down: never more threads than cores
    (2, 8, 1),    # more ranks than cores: still one thread each
])
def test_default_threads_is_the_affinity_share_of_each_local_process(cores, processes, expected):
    assert default_threads(cores, processes) == expected


def test_set_threads_applies_an_override_and_rejects_zero():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="threads must be at least 1"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_cli_threads_flag_defaults_to_automatic():
    common = ["generate", "x", "--model", "m"]
    assert build_parser().parse_args(common).threads is None
    assert build_parser().parse_args([*common, "--threads", "3"]).threads == 3
