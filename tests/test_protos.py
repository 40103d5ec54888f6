"""The installed stubs must be what protos/ generates today."""

import pathlib
import runpy
import subprocess
import sys

import tunewire.v1

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_generated_stubs_are_current(tmp_path):
    generate = runpy.run_path(str(REPO / "scripts" / "gen_protos.py"))["generate"]
    fresh = {p.name: p.read_bytes() for p in generate(tmp_path)}
    installed_dir = pathlib.Path(tunewire.v1.__file__).parent
    installed = {p.name: p.read_bytes() for p in installed_dir.iterdir() if p.is_file() and p.suffix in (".py", ".pyi")}
    stale = sorted(name for name in fresh if installed.get(name) != fresh[name])
    assert not stale, f"stubs out of date with protos/: {stale}; reinstall (pip install -e .) to regenerate"
    assert set(installed) == set(fresh), "tunewire/v1 holds files protos/ no longer generates"


def test_nothing_is_installed_as_a_generic_top_level_package(tmp_path):
    # From a directory outside the repository, only `tunewire` imports.
    code = (
        "import importlib.util as u; "
        "print([n for n in ('services', 'clients') if u.find_spec(n)], bool(u.find_spec('tunewire.services.dataset.server')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] True"
