"""The benchmark harness behind `guidance-rt bench` (runner.py), as ``bench.X`` for the command
line, the tests and the benchmark suites."""
from ..standard import IMPLEMENTATIONS
from . import runner
from .runner import (COLUMNS, FAMILY_PRESET, NOISY_IQR, OURS, PEERS, PREPARE, Config, Ctx, Options, Prepared,
                     Target, TensorMemory, Unsupported, _rel, _retime_noisy, _short, _time_interleaved,
                     baseline_guidance, count_flops, cpu_threads, default_presets, environment, format_table,
                     load_model_folder, load_target, meta_copy, nvml_info, ordered_configs, peak_memory,
                     prepare_diffusers, prepare_guiders, prepare_packed, prepare_reference, probe_step, report,
                     resolve_configs, run, standard_configs, summary, time_calls, to_json_ready)
