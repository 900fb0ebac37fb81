"""The README's code blocks, as the tests run them."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_python(heading: str) -> str:
    """The first ```python block after ``heading`` (its first occurrence) in README.md."""
    text = README.read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(heading):], re.S).group(1)
