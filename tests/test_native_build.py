"""The native extension's build bookkeeping, without compiling anything: one build directory
per distinct set of inputs (sources, flags, PyTorch, interpreter), a finished build imported
without the builder, a stale PyTorch build lock removed (never a live builder's), and the
stderr line that says what is being built and why."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from lmserve.quant import native


def _sources(directory: Path, body: str = "int f() { return 1; }") -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kernel.cpp").write_text(body)
    (directory / "kernel.h").write_text("#pragma once\n")
    return sorted(directory.iterdir())


def test_build_key_follows_every_input(tmp_path):
    files = _sources(tmp_path / "a")
    key = native.build_key(native.build_inputs(files, ["-O3"], "2.13.0", "/venv/bin/python 3.11"))
    assert key == native.build_key(native.build_inputs(files, ["-O3"], "2.13.0", "/venv/bin/python 3.11"))
    # the same contents elsewhere (another checkout) share the build
    same = _sources(tmp_path / "b")
    assert key == native.build_key(native.build_inputs(same, ["-O3"], "2.13.0", "/venv/bin/python 3.11"))
    changed = _sources(tmp_path / "c", "int f() { return 2; }")
    others = [native.build_inputs(changed, ["-O3"], "2.13.0", "/venv/bin/python 3.11"),
              native.build_inputs(files, ["-O2"], "2.13.0", "/venv/bin/python 3.11"),
              native.build_inputs(files, ["-O3"], "2.12.0", "/venv/bin/python 3.11"),
              native.build_inputs(files, ["-O3"], "2.13.0", "/other/bin/python 3.11")]
    keys = {native.build_key(inputs) for inputs in others}
    assert len(keys) == 4 and key not in keys and all(len(k) == 12 for k in keys)


def test_stale_torch_lock_is_removed(tmp_path, caplog):
    (tmp_path / native.TORCH_LOCK).write_text("")
    with caplog.at_level(logging.WARNING, logger="lmserve"), native.build_lock(tmp_path):
        assert not (tmp_path / native.TORCH_LOCK).exists()
    assert "interrupted" in caplog.text and str(tmp_path / native.TORCH_LOCK) in caplog.text


def test_live_builder_keeps_its_lock_until_it_dies(tmp_path, capfd):
    # A builder that holds the lmserve lock and PyTorch's lock file, then hangs (as a killed build would stop).
    builder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from lmserve.quant import native
        with native.build_lock(Path({str(tmp_path)!r})):
            (Path({str(tmp_path)!r}) / native.TORCH_LOCK).write_text("")
            print("building", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert builder.stdout.readline().strip() == "building"
        entered = threading.Event()

        def load():
            with native.build_lock(tmp_path):
                entered.set()

        waiter = threading.Thread(target=load)
        waiter.start()
        time.sleep(0.5)
        assert not entered.is_set() and (tmp_path / native.TORCH_LOCK).exists()
    finally:
        builder.kill()  # the build is interrupted: its lock file stays behind
        builder.wait()
    waiter.join(timeout=10)
    assert entered.is_set() and not (tmp_path / native.TORCH_LOCK).exists()
    assert "waiting for another process building the native kernels" in capfd.readouterr().err


def test_builds_once_per_input_set_then_imports(tmp_path, monkeypatch, capsys):
    from torch.utils import cpp_extension

    csrc = tmp_path / "csrc"
    _sources(csrc)
    monkeypatch.setattr(native, "_CSRC", csrc)
    monkeypatch.setattr(native, "_SOURCES", [str(csrc / "kernel.cpp")])
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    builds, imports = [], []
    monkeypatch.setattr(cpp_extension, "load", lambda name, build_directory, **kwargs: builds.append(
        (name, Path(build_directory))) or "built")
    monkeypatch.setattr(native, "_import_built", lambda name, build_dir: imports.append(name) or "imported")

    assert native._build_or_import() == "built"
    name, first_dir = builds[0]
    assert first_dir == tmp_path / "cache" / name and name.startswith(f"{native.BUILD_NAME}_")
    err = capsys.readouterr().err
    assert "compiling the native CPU kernels" in err and "first use on this machine" in err and "minute" in err

    assert native._build_or_import() == "imported" and imports == [name] and len(builds) == 1
    assert capsys.readouterr().err == ""

    (csrc / "kernel.h").write_text("#pragma once\n// changed\n")
    assert native._build_or_import() == "built"
    assert builds[1][0] != name and builds[1][1].parent == first_dir.parent
    assert "the sources changed" in capsys.readouterr().err


def test_interrupted_build_in_the_cache_is_cleared(tmp_path, monkeypatch, caplog):
    from torch.utils import cpp_extension

    csrc = tmp_path / "csrc"
    _sources(csrc)
    monkeypatch.setattr(native, "_CSRC", csrc)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    inputs = native.build_inputs([*csrc.glob("*.cpp"), *csrc.glob("*.h")], [*native._CFLAGS, *native._LDFLAGS])
    build_dir = tmp_path / "cache" / f"{native.BUILD_NAME}_{native.build_key(inputs)}"
    build_dir.mkdir(parents=True)
    (build_dir / native.TORCH_LOCK).write_text("")

    def fake_load(name, build_directory, **kwargs):
        assert not (Path(build_directory) / native.TORCH_LOCK).exists()  # PyTorch's builder would wait on it
        return "built"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    with caplog.at_level(logging.WARNING, logger="lmserve"):
        assert native._build_or_import() == "built"
    assert "interrupted" in caplog.text


def test_native_env_switch_still_turns_it_off(monkeypatch):
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    native.load.cache_clear()
    try:
        assert native.load() is None
    finally:
        native.load.cache_clear()
