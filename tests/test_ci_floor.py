"""CI's floor run installs what setup.py declares: the minimum of every runtime dependency (torch and triton
excepted: older wheels of those are multi-GB CUDA builds here) and of transformers, the parity tests' reference,
are the versions .ci/floor.txt pins."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pins(path: Path) -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return dict(line.split("==") for line in lines if line)


def minimums(requirements: str) -> dict[str, str]:
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)"', requirements))


def test_the_floor_run_installs_the_declared_minimums():
    setup = (ROOT / "setup.py").read_text()
    runtime = minimums(setup[setup.index("install_requires"):setup.index("extras_require")])
    dev = minimums(setup[setup.index('"dev"'):])
    floor = pins(ROOT / ".ci" / "floor.txt")
    held = pins(ROOT / ".ci" / "newest.txt")
    assert set(held) == {"torch", "triton"} and {k: floor[k] for k in held} == held
    declared = {name: version for name, version in runtime.items() if name not in held}
    assert declared and {name: floor.get(name) for name in declared} == declared
    assert floor["transformers"] == dev["transformers"]
    assert set(floor) == set(declared) | set(held) | {"transformers"}
