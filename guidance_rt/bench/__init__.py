"""The benchmark harness behind `guidance-rt bench` and the pytest-benchmark suites.

What is measured (shared/perf.md), for each model preset, batch size and guidance configuration,
for every implementation in the same process on the same inputs:

- implementations: ``guidance-rt`` (the packed GuidedDenoiser), ``reference`` (the sequential
  oracle, one plain forward per branch), and the installed peers that do the same job:
  ``diffusers`` (the stock pipelines' denoiser calls: CFG at 2B, the PAG pipelines' packed 3B
  call with diffusers' PAG attention processors, the SD3 pipeline's SLG second call at B with
  ``skip_layers``) and ``diffusers-guiders`` (``diffusers.guiders``, one denoiser call per branch
  as the modular pipelines run them). An implementation that does not offer a configuration has
  no row; a peer that crashes, or whose perturbation changes nothing (its output equals the CFG-only
  prediction), is reported MISSING with the reason; one whose output differs from the reference
  is flagged with the relative difference.
- the guided step: one denoiser call (every branch of the step) at the *probe step*, the first
  step of a ``steps``-step run (from step 1 on, where every peer's window is open) in which the
  most terms are active. Warm-up calls first, then ``repeats`` rounds of timed calls, each round
  one call of every (configuration, implementation) of a preset and batch, so that a burst of
  load on a shared machine lands on all of them alike; inputs rotate over three sets. CUDA events
  on a GPU, ``perf_counter`` elsewhere. Median and interquartile range.
- ratio: the configuration's median over the CFG-only step's median of the same implementation.
- floor: the same ratio in FLOPs of the rows each block really runs in guidance-rt's packed
  forward (``torch.utils.flop_counter`` around the GuidedDenoiser call; on a meta-device copy,
  or on the model itself for small models on the CPU). efficiency = floor / ratio.
- peak memory: CUDA: ``max_memory_allocated`` during one step minus what was allocated before;
  CPU: the peak of live tensor storage created by the step's ATen ops (a dispatch-mode tracker;
  temporaries inside a kernel are not seen). Weights and inputs are excluded on both.
- img/s: batch / (steps x median step), the denoiser's share of an N-step generation.

CPU absolute times say nothing about a GPU; CPU ratios on the tiny presets show the structure
(rows, forks) but not the kernels. Results are dicts (one per row) that the CLI prints and writes
as JSON and markdown. --size benches at another image size: inputs and FLOP counts alike.

The harness, by concern (each module imports only those before it): rows (the columns, and how a
failure is written into a row), configs (the configurations measured), targets (the model under
test and the contract with an implementation), peers and implementations (what is compared),
timing, memory, flops, check (a row's first call, against the reference), runner (the rows of a
run), environment and report (the table, the summary and the JSON). This package re-exports what
the command line, the tests and the benchmark suites use as ``bench.X``.
"""
from ..standard import IMPLEMENTATIONS
from .check import _rel
from .configs import (FAMILY_PRESET, Config, baseline_guidance, default_presets, ordered_configs, probe_step,
                      resolve_configs, standard_configs)
from .environment import environment, nvml_info
from .flops import count_flops
from .implementations import PREPARE, prepare_packed, prepare_reference
from .memory import TensorMemory, peak_memory
from .peers import prepare_diffusers, prepare_guiders
from .report import format_table, markdown, report, summary, to_json_ready
from .rows import COLUMNS, OURS, PEERS, _short
from .runner import META_FLOPS_PARAMS, Options, cpu_threads, run
from .targets import (Ctx, Prepared, Target, Unsupported, load_model_folder, load_target, meta_copy,
                      preset_size_problem, size_problem)
from .timing import NOISY_IQR, _retime_noisy, _time_interleaved, time_calls
