"""The vLLM engine host: a release's environment in a runtime, and each of its cells' spec.

Per release: the device (the provider's), the engine options and the release's base RuntimeSpec
(``vllm.runtime_for``: what vLLM really does where it differs from the shared settings), checked
against the model, the experiments and every ``--engine-arg`` override BEFORE the environment is built;
per cell: ``planner.cell_runtime`` on that base, the engine document and the launch.
"""

from __future__ import annotations

from dataclasses import replace

from kvmatrix.matrix import vllm as vllmenv
from kvmatrix.matrix.llama_host import extra_args
from kvmatrix.matrix.planner import Plan, PlannedCell, cell_runtime, requests_in_flight
from kvmatrix.plumbing.console import UserError, fail
from kvmatrix.runners.spec import SpecError


class VllmHost:
    family = "vllm"

    def __init__(self, plan: Plan, sources=None):
        self.plan = plan
        self.sides: dict = {}

    def prepare(self, provider, version: str, cells: list[PlannedCell], model) -> None:
        device = provider.vllm_device()
        opts, runtime = check(self.plan, version, device, model, {pc.cell.experiment for pc in cells})
        for backend in dict.fromkeys(pc.cell.backend for pc in cells):
            if self.plan.engine_args.get(backend):  # the options as the runner will override them, checked alike
                overridden = vllmenv.with_engine_args(opts, backend, self.plan.engine_args[backend])
                vllmenv.check(version, runtime, overridden, model.hf_dir, model.name)
        self.sides[version] = (provider.vllm(version, device), opts, runtime)

    def cell(self, pc: PlannedCell, common_prov: dict):
        """(runtime spec, engine doc, provenance, launch) of one cell."""
        side, opts, base = self.sides[pc.key]
        exp = self.plan.experiment(pc.cell)
        if exp.name == "prefix_reuse":  # every request in flight gets a sequence
            opts = replace(opts, max_num_seqs=requests_in_flight(exp))
        engine = {**vllmenv.engine_doc(side.env, opts, pc.cell.label), **extra_args(self.plan.engine_args, pc.cell.backend)}
        return cell_runtime(pc.cell, base, exp), engine, {**common_prov, **side.provenance}, side.launch


def check(plan: Plan, version: str, device: str, model, experiment_names: set[str]):
    """(options, base RuntimeSpec) of a vLLM release's cells, checked before anything is built or run."""
    opts = vllmenv.options(device, model.name)
    if model.hf_dir is None:
        fail(f"model {model.name} is a GGUF file without an HF directory; vLLM needs an HF model directory with "
             "config.json, a tokenizer and a chat template: use a preset or an HF directory")
    runtime = vllmenv.runtime_for(plan.runtime, opts, model.hf_dir)
    try:
        runtime.validate()
        for (name, _), exp in plan.experiments.items():
            if name in experiment_names:
                exp.validate(runtime)
    except SpecError as exc:
        raise UserError(str(exc)) from None
    vllmenv.check(version, runtime, opts, model.hf_dir, model.name)
    return opts, runtime
