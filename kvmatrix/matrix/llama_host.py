"""The llama.cpp engine host: a source's environment in a runtime, and each of its cells' spec.

Both runtimes' providers (``matrix/provision.py``) answer ``llama(source, builds)``; this module decides
which builds a runtime's cells need, and per cell the runtime spec (``planner.cell_runtime``: a CUDA build
offloads every layer), the engine document (server path, API path, label, ``--engine-arg``s, the stock
wheel's accepted deviations) and the launch + provenance of the cell's build variant.
"""

from __future__ import annotations

from kvmatrix.matrix import llamacpp
from kvmatrix.matrix.planner import Plan, PlannedCell, cell_runtime


class LlamaHost:
    family = "llama"

    def __init__(self, plan: Plan, sources: dict[str, llamacpp.LlamaSource]):
        self.plan, self.sources = plan, sources
        self.sides: dict = {}

    def prepare(self, provider, key: str, cells: list[PlannedCell], model) -> None:
        """The build (and bindings variants) of source ``key`` that ``cells`` run on."""
        wanted = {pc.cell.build or "server" for pc in cells}
        self.sides[key] = provider.llama(self.sources[key], wanted)

    def cell(self, pc: PlannedCell, common_prov: dict):
        """(runtime spec, engine doc, provenance, launch) of one cell."""
        cell, side = pc.cell, self.sides[pc.key]
        runtime = cell_runtime(cell, self.plan.runtime, self.plan.experiment(cell), gpu_offload=side.cuda)
        variant_built = cell.build is not None
        launch, prov = side.launch(cell.build if variant_built else "server")
        engine = {"server": side.server, "variant": None if cell.experiment == "prefix_reuse" else cell.variant,
                  "label": cell.label, **extra_args(self.plan.engine_args, cell.backend)}
        if cell.build == "stock" and runtime.n_gpu_layers != 0:
            engine["accepted_deviations"] = dict(llamacpp.STOCK_DEVIATIONS)
        return runtime, engine, {**prov, **common_prov}, launch


def extra_args(engine_args: dict[str, list[str]], backend: str) -> dict:
    """``cell.engine["extra_args"]`` of a backend's cells (nothing without any: their cells stay as they were)."""
    return {"extra_args": list(engine_args[backend])} if engine_args.get(backend) else {}
