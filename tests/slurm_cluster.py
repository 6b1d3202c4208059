"""A throwaway one-node Slurm cluster on this machine, for tests/test_sweep_slurm.py.

Installs Debian's slurm-wlm and munge where missing (apt-get), then starts munged, slurmctld and slurmd with
everything (munge key and socket, slurm.conf, state, spool, logs, pid files) in a fresh folder and on free ports,
so nothing of the machine's own Slurm or munge setup is used or changed. Clients find the cluster through the
SLURM_CONF in `cluster.env`, which jobs inherit. No cgroups, no accounting: proctrack/linuxproc, task/none.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time

PACKAGES = ["slurm-wlm", "munge"]
DAEMONS = ["munged", "slurmctld", "slurmd"]
APT_GET = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]  # waits for another apt-get (an unattended upgrade) to finish


class SlurmError(RuntimeError):
    pass


def as_root() -> list:
    """The command prefix that runs as root: none for root, `sudo -n` otherwise; None where neither is possible."""
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n"]
    return None


def install(root: list) -> None:
    if all(shutil.which(daemon) for daemon in DAEMONS):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    command = root + [
        "env",
        "DEBIAN_FRONTEND=noninteractive",
        *APT_GET,
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        *PACKAGES,
    ]
    try:
        if subprocess.run(command, capture_output=True, env=env, timeout=600).returncode != 0:  # no package lists yet
            update = subprocess.run(root + [*APT_GET, "update", "-q"], capture_output=True, text=True, timeout=600)
            result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
            if result.returncode != 0:
                raise SlurmError(
                    f"could not install {' '.join(PACKAGES)} with apt-get:\n{update.stderr[-2000:]}\n"
                    f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
                )
    except subprocess.TimeoutExpired as error:
        raise SlurmError(f"apt-get took more than {error.timeout} s: {' '.join(error.cmd)}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SlurmCluster:
    def __init__(self, root: list):
        self.root = root
        # /tmp, not pytest's tmp_path: munged refuses a socket in a folder not everyone can enter (0700 above it)
        self.folder = tempfile.mkdtemp(prefix="slurm-test-", dir="/tmp")
        os.chmod(self.folder, 0o755)
        self.node = socket.gethostname().split(".")[0]
        self.conf = os.path.join(self.folder, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.pid_files = []

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def start(self) -> None:
        munge_socket = self.path("munge.socket")
        key_folder = self.path("munge")
        os.makedirs(key_folder, mode=0o700)
        with open(os.path.join(key_folder, "munge.key"), "wb") as key:
            key.write(os.urandom(128))
        os.chmod(key.name, 0o600)
        if self.root:  # munged runs as root and wants its key its own
            subprocess.run(self.root + ["chown", "-R", "root:root", key_folder], check=True)
        self.daemon(
            "munged",
            "--socket",
            munge_socket,
            "--key-file",
            key.name,
            "--pid-file",
            self.path("munged.pid"),
            "--log-file",
            self.path("munged.log"),
            "--seed-file",
            os.path.join(key_folder, "munged.seed"),
            pid_file=self.path("munged.pid"),
        )
        for folder in ("state", "spool"):
            os.makedirs(self.path(folder))
        with open(self.conf, "w") as conf:
            conf.write(f"""\
ClusterName=sweeptest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
# cred_expire: a requeued job waits about this long before it may start again (default 120 s)
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire=5
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={self.path("state")}
SlurmdSpoolDir={self.path("spool")}
SlurmctldPidFile={self.path("slurmctld.pid")}
SlurmdPidFile={self.path("slurmd.pid")}
SlurmctldLogFile={self.path("slurmctld.log")}
SlurmdLogFile={self.path("slurmd.log")}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
KillWait=10
MinJobAge=600
SchedulerParameters=sched_interval=2
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        self.daemon("slurmctld", "-i", pid_file=self.path("slurmctld.pid"))
        self.daemon("slurmd", "-N", self.node, pid_file=self.path("slurmd.pid"))
        deadline = time.time() + 60
        while time.time() < deadline:
            states = self.run("sinfo", "--noheader", "--format=%t", check=False).stdout.split()
            if states == ["idle"]:
                return
            time.sleep(1)
        raise SlurmError(f"the node is not idle after 60 s (sinfo: {states}){self.logs()}")

    def daemon(self, name: str, *flags: str, pid_file: str) -> None:
        """Start one (it forks into the background) and wait for its pid file."""
        result = subprocess.run(self.root + ["env", f"SLURM_CONF={self.conf}", name, *flags], capture_output=True, text=True)
        deadline = time.time() + 20
        while result.returncode == 0 and not os.path.exists(pid_file) and time.time() < deadline:
            time.sleep(0.2)
        if os.path.exists(pid_file):
            self.pid_files.append(pid_file)
            return
        raise SlurmError(f"{name} did not start (exit code {result.returncode}): {result.stderr.strip()}{self.logs()}")

    def logs(self) -> str:
        text = ""
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            if os.path.exists(self.path(name)):
                text += f"\n--- {self.path(name)} (end) ---\n" + open(self.path(name)).read()[-3000:]
        return text

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=60)
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(command)} failed: {result.stderr.strip()}")
        return result

    def stop(self) -> None:
        """Cancel what is still queued (a failed test's jobs), then stop the daemons this cluster started (by their pid
        files), the last started first."""
        if self.path("slurmctld.pid") in self.pid_files:
            self.run("scancel", "--partition=debug", check=False)
            deadline = time.time() + 20
            while self.run("squeue", "--noheader", check=False).stdout.strip() and time.time() < deadline:
                time.sleep(0.5)
        for pid_file in reversed(self.pid_files):
            pid = open(pid_file).read().strip()
            subprocess.run(self.root + ["kill", pid], capture_output=True)
            deadline = time.time() + 15
            while os.path.exists(f"/proc/{pid}") and time.time() < deadline:
                time.sleep(0.2)
        self.pid_files = []
        subprocess.run(self.root + ["rm", "-rf", self.folder], capture_output=True)
