"""An existing server (``run --base-url URL --engine vllm|llamacpp``): cells on a server kvmatrix did not start.

Nothing is built, generated or started. Before any cell, the catalogue adapter of the server's interface
attaches to the URL and reads back, through the server's own API, its identity (``identify``: the model it
serves, the vLLM version) and its settings (``effective``: n_ctx, slots, prefix caching, seed, ... as the
adapter reads them for the servers kvmatrix starts). Those settings become the cells' RuntimeSpec, so the
runner's requested-vs-effective check holds by construction for what the API shows and lists the rest
under ``runtime.unverified``; the experiment is checked against them (a config that does not fit the
server's context is refused in one line). Cache hits are verified by the same engine counters as always;
an adapter refuses a server on which that is impossible, naming what to enable. Provenance says
``started_by_kvmatrix: false`` with the URL. The runner runs in a small cached venv with its packages.
"""

from __future__ import annotations

from kvmatrix import catalog
from kvmatrix.matrix import llamacpp
from kvmatrix.matrix.host import Launch
from kvmatrix.matrix.planner import Plan, PlannedCell, cell_runtime
from kvmatrix.plumbing import envs
from kvmatrix.plumbing.console import UserError, say
from kvmatrix.runners.backends import get_backend
from kvmatrix.runners.backends.base import EngineError
from kvmatrix.runners.backends.http import HttpClient
from kvmatrix.runners.spec import CellSpec, RuntimeSpec, SpecError

#: settings every request carries (kvmatrix's values, not the server's defaults)
REQUEST_LEVEL = ("seed", "temperature")


class ExternalHost:
    family = "external"

    def __init__(self, plan: Plan):
        self.plan = plan
        self.servers: dict[str, dict] = {}
        self.python = None

    def prepare(self, url: str, cells: list[PlannedCell], log_dir) -> None:
        """Identify the server at ``url`` and read its settings back, once, before any cell (exit 2 if refused)."""
        backend_name = cells[0].cell.backend
        adapter = get_backend(backend_name)
        client = HttpClient(url, timeout_s=30)
        try:
            ident = adapter.identify(client)
        except (OSError, ValueError, KeyError, EngineError) as exc:
            raise UserError(f"--base-url {url}: no {catalog.FAMILIES[cells[0].family]} server answers its API ({exc}); start it or "
                            "check --base-url / --engine") from None
        finally:
            client.close()
        engine = {"base_url": url, "label": backend_name, **ident["engine"]}
        probe_spec = CellSpec(cell_id=f"probe-{backend_name}", run=self.plan.run_name, phase=cells[0].cell.phase,
                              backend=backend_name, model=ident["model"], runtime=self.plan.runtime,
                              experiment=self.plan.experiment(cells[0].cell), out_dir=str(self.plan.out_dir),
                              engine=engine, provenance={})
        backend = adapter(probe_spec, log_dir)
        try:
            backend.render()
            backend.start()
            effective = backend.effective()
        except EngineError as exc:
            raise UserError(f"--base-url {url}: {exc}") from None
        finally:
            backend.stop()
            backend.log_path.unlink(missing_ok=True)
        fields = set(RuntimeSpec.__dataclass_fields__) - set(REQUEST_LEVEL)
        runtime = RuntimeSpec(**{**self.plan.runtime.to_dict(), **{k: v for k, v in effective.items() if k in fields}})
        for pc in cells:
            exp = self.plan.experiment(pc.cell)
            try:
                exp.validate(cell_runtime(pc.cell, runtime, exp))
            except SpecError as exc:
                raise UserError(f"--base-url {url} (n_ctx {runtime.n_ctx}, {runtime.n_parallel} slot(s)): {exc}") \
                    from None
        say(f"{url}: {ident['model']['name']} on {backend_name} (not started by kvmatrix): n_ctx {runtime.n_ctx}, "
            f"{runtime.n_parallel} slot(s), prefix caching {'on' if runtime.prefix_caching else 'off'}")
        self.servers[url] = {"runtime": runtime, "model": ident["model"], "engine": ident["engine"]}
        if self.python is None:
            self.python = envs.ensure_venv("runner", list(llamacpp.RUNNER_REQUIREMENTS))

    def model_doc(self, url: str) -> dict:
        return dict(self.servers[url]["model"])

    def cell(self, pc: PlannedCell, common_prov: dict):
        """(runtime spec, engine doc, provenance, launch) of one cell on the server."""
        server = self.servers[pc.key]
        engine = {"base_url": pc.key, "label": pc.cell.label, "variant": pc.cell.variant, **server["engine"]}
        prov = {**common_prov, "runtime_kind": "external", "started_by_kvmatrix": False, "base_url": pc.key}
        runtime = cell_runtime(pc.cell, server["runtime"], self.plan.experiment(pc.cell))
        return runtime, engine, prov, Launch(python=self.python, env={})
