"""A real single-host Slurm cluster for the Slurm test tier: Debian's munge + slurmctld + slurmd, started here.

No systemd, no files outside ``root``: a generated munge key and socket, a generated ``slurm.conf`` for this
host (its CPUs and memory, ``MaxArraySize`` chosen by the caller so arrays get split), state and spool under
``root``, the daemons in the foreground as children of this process (stopped by PID on exit). Clients
(``sbatch``, ``squeue``, ``scancel``, kvmatrix's ``--submit``) find it through ``SLURM_CONF``.

    with LocalSlurm(tmp_path) as cluster:   # or: python -m tests.slurm_cluster DIR (runs until Ctrl-C)
        env = cluster.env                   # SLURM_CONF set
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "scontrol")


def missing() -> str | None:
    """Why a local cluster cannot start here (None: it can)."""
    if os.geteuid() != 0:
        return "the Slurm tier starts slurmd as root"
    gone = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    return f"not installed: {', '.join(gone)} (apt-get install slurmctld slurmd slurm-client munge)" if gone else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    def __init__(self, root: Path, max_array_size: int = 1001, cpus: int | None = None):
        self.root = Path(root)
        self.max_array_size = max_array_size
        self.cpus = cpus or os.cpu_count() or 1
        self.procs: list[subprocess.Popen] = []
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- set-up ----------------------------------------------------------------------------------------
    def _write(self) -> None:
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
        self.conf.write_text("\n".join([
            "ClusterName=kvmatrix-test",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={r}/munge/munge.socket",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU_Memory",
            "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=1",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "ReturnToService=2", "MailProg=/bin/true", f"MaxArraySize={self.max_array_size}",
            "SlurmctldTimeout=30", "SlurmdTimeout=30", "InactiveLimit=0", "KillWait=5", "MinJobAge=300",
            "DefMemPerCPU=1024",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={mem_mb} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
            ""]))

    def _start(self, *cmd: str, log: str) -> None:
        out = open(self.root / "log" / log, "ab")  # noqa: SIM115 - kept open for the daemon's life
        self.procs.append(subprocess.Popen(list(cmd), env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def start(self, timeout: float = 60) -> LocalSlurm:
        self._write()
        r = self.root
        self._start(_exe("munged"), "--foreground", "--force", f"--socket={r}/munge/munge.socket",
                    f"--key-file={r}/munge/munge.key", f"--pid-file={r}/munge/munged.pid",
                    f"--seed-file={r}/munge/munged.seed", f"--log-file={r}/log/munged.log", log="munged.out")
        self._wait(lambda: (r / "munge" / "munge.socket").exists(), 15, "munged")
        self._start(_exe("slurmctld"), "-D", "-i", "-f", str(self.conf), log="slurmctld.out")
        self._wait(lambda: self._ok("scontrol", "ping"), timeout, "slurmctld")
        self._start(_exe("slurmd"), "-D", "-f", str(self.conf), log="slurmd.out")
        self._wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%T").stdout, timeout, "slurmd")
        return self

    def _ok(self, *cmd: str) -> bool:
        p = self.run(*cmd)
        return p.returncode == 0 and "DOWN" not in p.stdout

    def _wait(self, ready, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ready():
                return
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                break
            time.sleep(0.5)
        logs = "\n".join(f"--- {f.name}\n" + f.read_text(errors="replace")[-1500:]
                         for f in sorted((self.root / "log").glob("*")) if f.is_file())
        self.stop()
        raise RuntimeError(f"{what} did not come up within {timeout:.0f}s\n{logs}")

    # -- use -------------------------------------------------------------------------------------------
    def run(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)

    def jobs(self) -> list[str]:
        """Job ids in the queue (array tasks expanded), pending or running."""
        return self.run("squeue", "-h", "-r", "-o", "%i %T").stdout.split("\n") if self.procs else []

    def wait_idle(self, timeout: float = 900) -> None:
        """Until the queue is empty."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not [j for j in self.jobs() if j.strip()]:
                return
            time.sleep(1)
        raise TimeoutError(f"jobs still queued after {timeout:.0f}s: {self.jobs()}")

    # -- tear-down -------------------------------------------------------------------------------------
    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for p in reversed(self.procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs = []

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":  # a cluster for trying things by hand: SLURM_CONF=DIR/slurm.conf sbatch ...
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout`, kill: the daemons stop with it
    with LocalSlurm(Path(sys.argv[1]), max_array_size=int(sys.argv[2]) if len(sys.argv) > 2 else 1001) as c:
        print(f"export SLURM_CONF={c.conf}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
