"""The README's training example runs as written (on a Hopper GPU)."""

import re
from pathlib import Path

from conftest import requires_sm90

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(marker: str) -> str:
    """The README's python block whose first line is `# <marker>`."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    matches = [b for b in blocks if b.startswith(f"# {marker}\n")]
    assert len(matches) == 1, f"README has {len(matches)} blocks starting '# {marker}'"
    return matches[0]


def test_training_example_is_in_the_readme():
    assert "moe.update_bias" in readme_block("README training example")


@requires_sm90
def test_training_example_runs_and_learns():
    exec(compile(readme_block("README training example"), str(README), "exec"), {})
