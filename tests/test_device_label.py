"""The device a result row records: the CPU's model name, read from /proc/cpuinfo where it exists."""

from __future__ import annotations

import platform

import torch

from wmbench.devices import cpu_name, device_label


def test_cpu_name_is_the_first_model_name_line(tmp_path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t:  AMD   EPYC 9654\nprocessor\t: 1\nmodel name\t: other\n")
    assert cpu_name(info) == "AMD EPYC 9654"


def test_cpu_name_falls_back_to_platform(tmp_path) -> None:
    assert cpu_name(tmp_path / "missing") == " ".join(platform.processor().split())
    empty = tmp_path / "empty"
    empty.write_text("processor\t: 0\nmodel name\t:\n")
    assert cpu_name(empty) == " ".join(platform.processor().split())


def test_cpu_rows_name_the_processor() -> None:
    label = device_label(torch.device("cpu"))
    assert label == (f"cpu {cpu_name()}" if cpu_name() else "cpu")
