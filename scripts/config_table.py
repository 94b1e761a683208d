"""Print (or write into README.md) the configuration table built from the Settings model.

python scripts/config_table.py            # print the table
python scripts/config_table.py --write    # replace the table between the README markers
"""

from __future__ import annotations

import sys
from pathlib import Path

from dpo_service.settings import Settings

START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"
README = Path(__file__).resolve().parent.parent / "README.md"


def table() -> str:
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.default
        if hasattr(default, "value"):
            default = default.value
        shown = "—" if default is None else f"`{default}`"
        env = field.validation_alias if isinstance(field.validation_alias, str) else None
        env = env or f"DPO_{name.upper()}"
        rows.append(f"| `{env}` | {shown} | {field.description or ''} |")
    return "\n".join(rows)


def readme_with_table(text: str) -> str:
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{table()}\n{END}{tail}"


if __name__ == "__main__":
    if "--write" in sys.argv:
        README.write_text(readme_with_table(README.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        print(table())
