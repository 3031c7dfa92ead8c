"""One virtual environment per peer library, made on first use, each with the CPU build of torch.

    python benchmarks/peers/envs.py            # make (or check) every peer environment
    python benchmarks/peers/envs.py sparsify   # just one

Environments live in <cache>/peer-envs/<peer> (<cache> = $MONOSEMANTIC_CACHE or
~/.cache/monosemantic). Steps for each:
  1. `python -m venv` with the interpreter running this script;
  2. `pip install torch==2.13.0` first, so that torch is already satisfied when the peer's
     requirements are resolved (a bare `pip install <peer>` can pull a multi-GB CUDA build);
  3. the peer, with a constraints file pinning torch==2.13.0 so no dependency can replace it;
     dictionary-learning 0.1.0 pulls a CUDA torch through nnsight (only its activation buffer
     imports nnsight), so it is installed with --no-deps plus the two packages its trainers import;
  4. a check that torch is 2.13.0 and has no CUDA, then a `ready.json` stamp holding the spec, so a
     changed spec rebuilds the environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

TORCH = "torch==2.13.0"

PEERS: dict[str, dict] = {
    "sparsify": {"package": "eai-sparsify==1.3.3", "import": "sparsify",
                 "steps": [[TORCH], ["eai-sparsify==1.3.3"]]},
    "saelens": {"package": "sae-lens==6.54.12", "import": "sae_lens",
                "steps": [[TORCH], ["sae-lens==6.54.12"]]},
    "dictlearn": {"package": "dictionary-learning==0.1.0", "import": "dictionary_learning",
                  "steps": [[TORCH], ["--no-deps", "dictionary-learning==0.1.0"],
                            ["einops>=0.7", "numpy", "safetensors"]]},
}
"""peer name -> the PyPI release, its import name, and the pip install steps in order."""


def cache_root() -> Path:
    root = os.environ.get("MONOSEMANTIC_CACHE") or os.path.join(Path.home(), ".cache", "monosemantic")
    return Path(root).expanduser()


def env_dir(peer: str) -> Path:
    return cache_root() / "peer-envs" / peer


def env_python(peer: str) -> Path:
    return env_dir(peer) / "bin" / "python"


def _run(cmd: list[str], log) -> None:
    log(" ".join(cmd))
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stdout.splitlines()[-30:])
        raise RuntimeError(f"command failed ({done.returncode}): {' '.join(cmd)}\n{tail}")


def ensure_env(peer: str, log=print) -> Path:
    """The python of `peer`'s environment, building the environment first if it is missing or was
    built from another spec. Raises RuntimeError naming the failing pip command."""
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; pick one of {', '.join(PEERS)}")
    spec = PEERS[peer]
    folder, python = env_dir(peer), env_python(peer)
    stamp = folder / "ready.json"
    if stamp.exists() and python.exists() and json.loads(stamp.read_text()) == spec:
        return python
    if folder.exists():
        log(f"rebuilding {folder} (incomplete or built from another spec)")
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", str(folder)], log)
    constraints = folder / "constraints.txt"
    constraints.write_text(TORCH + "\n")
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
           "-c", str(constraints)]
    for step in spec["steps"]:
        _run(pip + step, log)
    probe = subprocess.run([str(python), "-c", "import json, torch, importlib; "
                            f"importlib.util.find_spec({spec['import']!r}) or exit(3); "
                            "print(json.dumps([torch.__version__, torch.version.cuda]))"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if probe.returncode != 0:
        raise RuntimeError(f"{peer} environment {folder} is broken: {probe.stdout[-2000:]}")
    version, cuda = json.loads(probe.stdout.strip().splitlines()[-1])
    if not version.startswith("2.13.0") or cuda is not None:
        raise RuntimeError(f"{peer} environment has torch {version} (CUDA {cuda}), expected the CPU "
                           f"build of {TORCH}; delete {folder} and install torch first")
    stamp.write_text(json.dumps(spec))
    log(f"{peer}: ready ({spec['package']}, torch {version}) in {folder}")
    return python


def main() -> None:
    peers = sys.argv[1:] or list(PEERS)
    for p in peers:
        print(ensure_env(p))


if __name__ == "__main__":
    main()
