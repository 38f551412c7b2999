"""The README's Python example runs as written (on a small run instead of runs/demo)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_example_runs(tiny_run):
    text = README.read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'vqvae.Run("runs/demo")' in code
    namespace: dict = {}
    exec(compile(code.replace('"runs/demo"', repr(str(tiny_run))), str(README), "exec"), namespace)
    assert namespace["encoded"].codes.shape == (1, 7, 7) and namespace["x_hat"].shape == (1, 1, 25, 25)
    assert namespace["samples"].shape == (4, 1, 28, 28) and namespace["bits"].shape == (1,)
