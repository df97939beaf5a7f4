"""The documentation's relative links resolve, and its tables render as tables.

Links: files exist and anchors name real headings.

Checked: README.md, CHANGELOG.md and docs/*.md. A link is a Markdown inline link or image
(`[text](target)`), a reference definition (`[id]: target`) or an HTML `href`/`src`. Links
inside code (fenced blocks, inline spans) are text, not links. Web links (`https:`,
`mailto:`, ...) are not fetched. An anchor (`#part`) must match a heading of the target
Markdown file as GitHub names it (lowercase, punctuation dropped, each space a hyphen, `-1`,
`-2` ... for repeats) or an explicit `<a id="...">`.

Tables (GitHub's rules): a table runs from its header and `|---|` line to the first blank
line, so a paragraph written right under it becomes a row; every row must have the header's
number of cells (unescaped `|`, code spans included, split cells).

Names: every repository file, folder or glob a page names from the root in prose or code
(`tests/test_docs.py`, `deploy/`), and every `python -m cogvideox_cog...` module, exists.

Cog commands: no page but the changelog says `cog predict`, which Cog 0.20 deprecated for
`cog run`.

Inputs: every input a predictor declares has a row in docs/inputs.md's table, and every row of
an inputs table (on any page: a table whose first header cell is `input`) names a declared
input and states its bounds (`ge`-`le`, or `ge` to `le`), choices and, in a `default` column,
its literal default. The predictors are read as source, as `cog build` reads them, so torch is
not imported.
"""

from __future__ import annotations

import ast
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 190  # a README read in five minutes; details live in docs/

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)
_INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]"  # [text], one level of nested brackets allowed
    r"\(\s*<?([^()\s<>]*)>?(?:\s+[\"'(][^)]*)?\)"  # (target "optional title")
)
_REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
_HTML_LINK = re.compile(r"""<[a-z]+\s[^>]*?\b(?:href|src)\s*=\s*["']([^"']*)["']""", re.I)
_HTML_ANCHOR = re.compile(r"""<a\s[^>]*?\b(?:id|name)\s*=\s*["']([^"']+)["']""", re.I)
_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)
_TABLE_DELIMITER = re.compile(r"^ {0,3}\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")
_CELL_BORDER = re.compile(r"(?<!\\)\|")


@dataclass(frozen=True)
class Problem:
    kind: str  # "file" or "anchor"
    where: str  # path:line
    target: str
    why: str

    def __str__(self) -> str:
        return f"{self.where}: {self.target}: {self.why}"


def doc_files(root: Path = ROOT) -> list[Path]:
    named = [root / "README.md", root / "CHANGELOG.md"]
    return [p for p in named if p.exists()] + sorted((root / "docs").glob("*.md"))


def _blank(text: str) -> str:
    """Spaces for every character but newlines, so offsets keep their line numbers."""
    return re.sub(r"[^\n]", " ", text)


def prose(markdown: str) -> str:
    """The text with code blocks and code spans blanked out, lines kept in place."""
    lines, fence = [], None
    for line in markdown.splitlines(keepends=True):
        opening = _FENCE.match(line)
        if fence is None and opening:
            fence = opening[1]
            lines.append(_blank(line))
        elif fence is not None:
            closing = _FENCE.match(line)
            if closing and closing[1][0] == fence[0] and len(closing[1]) >= len(fence):
                fence = None
            lines.append(_blank(line))
        else:
            lines.append(line)
    text = "".join(lines)
    # A code span does not cross a blank line (a paragraph break).
    return _CODE_SPAN.sub(
        lambda m: m[0] if "\n\n" in m[0] else _blank(m[0]),
        text,
    )


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text)  # HTML tags
    text = text.replace("`", "").replace("*", "")
    text = "".join(ch for ch in text.strip().lower() if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every anchor a Markdown file has: its headings' slugs and explicit HTML ids."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    plain = prose(markdown)
    # prose() keeps every line in place: find headings outside code, read their original text.
    for original, line in zip(markdown.split("\n"), plain.split("\n"), strict=True):
        if not _HEADING.match(line):
            continue
        base = slug(_HEADING.match(original)[1])
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    found.update(m[1] for m in _HTML_ANCHOR.finditer(plain))
    return found


def links(markdown: str) -> list[tuple[int, str]]:
    """(line number, target) of every link outside code."""
    plain = prose(markdown)
    hits = []
    for pattern in (_INLINE_LINK, _REFERENCE_DEF, _HTML_LINK):
        for match in pattern.finditer(plain):
            hits.append((match.start(1), match[1]))
    return [(plain.count("\n", 0, start) + 1, target) for start, target in sorted(hits)]


def check(files: list[Path], root: Path = ROOT) -> list[Problem]:
    problems = []
    anchors_of: dict[Path, set[str]] = {}
    for source in files:
        text = source.read_text(encoding="utf-8")
        for line, target in links(text):
            where = f"{source.relative_to(root)}:{line}"
            if not target or _SCHEME.match(target) or target.startswith("//"):
                continue
            path_part, _, anchor = target.partition("#")
            path_part = urllib.parse.unquote(path_part)
            if not path_part:
                resolved = source
            elif path_part.startswith("/"):
                resolved = root / path_part.lstrip("/")
            else:
                resolved = source.parent / path_part
            resolved = resolved.resolve()
            if not resolved.is_relative_to(root) or not resolved.exists():
                problems.append(Problem("file", where, target, "no such file or folder"))
                continue
            if not anchor or resolved.suffix != ".md" or not resolved.is_file():
                continue
            if resolved not in anchors_of:
                anchors_of[resolved] = anchors(resolved.read_text(encoding="utf-8"))
            if urllib.parse.unquote(anchor) not in anchors_of[resolved]:
                problems.append(Problem("anchor", where, target, "no such heading"))
    return problems


def cell_count(row: str) -> int:
    row = row.strip().removeprefix("|")
    if row.endswith("|") and not row.endswith("\\|"):
        row = row[:-1]
    return len(_CELL_BORDER.split(row))


def table_problems(source: Path, root: Path = ROOT) -> list[Problem]:
    """Rows whose cell count differs from their table's header, outside code blocks."""
    raw = source.read_text(encoding="utf-8").splitlines()
    shown = prose("\n".join(raw)).splitlines()
    problems, width = [], None
    for index, (line, visible) in enumerate(zip(raw, shown, strict=True)):
        if width is None:
            header = shown[index - 1] if index else ""
            if "|" in visible and "|" in header and _TABLE_DELIMITER.match(visible):
                width = cell_count(raw[index - 1])
            continue
        if not visible.strip():
            width = None
        elif cell_count(line) != width:
            where = f"{source.relative_to(root)}:{index + 1}"
            why = f"{cell_count(line)} cells in a table of {width} (a blank line ends a table)"
            problems.append(Problem("table", where, line.strip()[:60], why))
    return problems


def _report(problems: list[Problem]) -> str:
    return "\n".join(str(p) for p in problems)


def test_the_docs_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in doc_files()}
    assert {"README.md", "CHANGELOG.md", "docs/architecture.md"} <= names


def test_every_relative_link_in_the_docs_points_to_a_file_that_exists():
    problems = [p for p in check(doc_files()) if p.kind == "file"]
    assert not problems, _report(problems)


def test_every_anchor_in_the_docs_points_to_a_heading_that_exists():
    problems = [p for p in check(doc_files()) if p.kind == "anchor"]
    assert not problems, _report(problems)


def test_every_table_row_in_the_docs_has_its_headers_cells():
    problems = [p for source in doc_files() for p in table_problems(source)]
    assert not problems, _report(problems)


def test_the_readme_links_every_docs_page():
    linked = {target.partition("#")[0] for _, target in links((ROOT / "README.md").read_text())}
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    assert not pages - linked, f"not linked from README.md: {sorted(pages - linked)}"


# Cog 0.20 renamed `cog predict` to `cog run` (the yaml files' `run:` key came with it); the
# old command still works but warns that it is deprecated. The changelog records history.
_DEPRECATED_COG_PREDICT = re.compile(r"\bcog\s+(?:-f\s+\S+\s+)?predict\b")


def deprecated_cog_commands(source: Path, root: Path = ROOT) -> list[Problem]:
    """Every `cog predict` in a page, code blocks included: they are what users copy."""
    problems = []
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        for match in _DEPRECATED_COG_PREDICT.finditer(line):
            where = f"{source.relative_to(root)}:{number}"
            problems.append(Problem("cog", where, match[0], "deprecated: use cog run"))
    return problems


def test_the_docs_run_models_with_cog_run_not_the_deprecated_cog_predict():
    pages = [p for p in doc_files() if p.name != "CHANGELOG.md"]
    problems = [p for page in pages for p in deprecated_cog_commands(page)]
    assert not problems, _report(problems)


# `cog run` gives setup() 300 s (its --setup-timeout default), then gives up. A first run
# downloads 20+ GB in setup(); with pget, which resumes nothing, every retry starts again from
# byte 0. So every `cog run` a page shows for copying says how long setup may take.
COG_SETUP_TIMEOUT_S = 300
_COG_RUN = re.compile(r"\bcog\s+(?:-f\s+\S+\s+)?run\b(.*)")
_SETUP_TIMEOUT = re.compile(r"--setup-timeout[\s=](\d+)")


def code_commands(markdown: str) -> list[tuple[int, str]]:
    """(first line, command) of each command in the fenced code blocks, with its backslash
    continuations joined; comment lines are not commands."""
    commands: list[tuple[int, str]] = []
    fence, pending = None, None
    for number, line in enumerate(markdown.split("\n"), 1):
        marker = _FENCE.match(line)
        if fence is None or (marker and marker[1][0] == fence[0] and len(marker[1]) >= len(fence)):
            fence = marker[1] if fence is None and marker else None
            pending = None
            continue
        if pending is None and (not line.strip() or line.lstrip().startswith("#")):
            continue
        first, text = pending or (number, "")
        text += line.rstrip().removesuffix("\\")
        pending = (first, text + " ") if line.rstrip().endswith("\\") else None
        if pending is None:
            commands.append((first, text.strip()))
    return commands


def short_setup_commands(source: Path, root: Path = ROOT) -> list[Problem]:
    """Every `cog run` in a page's code blocks that leaves setup Cog's default 300 s."""
    problems = []
    for number, command in code_commands(source.read_text(encoding="utf-8")):
        match = _COG_RUN.search(command)
        if not match:
            continue
        timeout = _SETUP_TIMEOUT.search(match[1])
        if not timeout or int(timeout[1]) <= COG_SETUP_TIMEOUT_S:
            where = f"{source.relative_to(root)}:{number}"
            why = "a first run downloads the weights: give --setup-timeout 3600"
            problems.append(Problem("cog", where, command[:60], why))
    return problems


def test_every_cog_run_in_the_docs_gives_setup_time_to_download_the_weights():
    pages = [p for p in doc_files() if p.name != "CHANGELOG.md"]
    problems = [p for page in pages for p in short_setup_commands(page)]
    assert not problems, _report(problems)


# The inputs tables against the predictors' declarations.

# Every page with a table headed `input`: found, not listed, so a new one is checked too.
INPUT_TABLES = tuple(
    p.relative_to(ROOT).as_posix()
    for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    if re.search(r"^ {0,3}\|\s*input\s*\|", p.read_text(encoding="utf-8"), re.MULTILINE)
)
_INPUT_HEADER = re.compile(r"^ {0,3}\|\s*input\s*\|")
_INPUT_NAME = re.compile(r"`([a-z_]+)`")


def declared_inputs(sources: list[str]) -> dict[str, dict]:
    """Each input of the predictors' `run()`: the `ge`, `le` and `choices` its Input() gives."""
    declared: dict[str, dict] = {}
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if not (isinstance(node, ast.FunctionDef) and node.name == "run"):
                continue
            arguments = node.args.args[len(node.args.args) - len(node.args.defaults) :]
            for argument, default in zip(arguments, node.args.defaults, strict=True):
                if isinstance(default, ast.Call) and getattr(default.func, "id", "") == "Input":
                    rules = declared.setdefault(argument.arg, {})
                    for keyword in default.keywords:
                        if keyword.arg in ("ge", "le", "choices"):
                            rules[keyword.arg] = ast.literal_eval(keyword.value)
                        elif keyword.arg == "default":  # per predictor: prompt's differs
                            value = ast.literal_eval(keyword.value)
                            rules.setdefault("defaults", []).append(value)
    return declared


def predictor_inputs(root: Path = ROOT) -> dict[str, dict]:
    return declared_inputs([p.read_text() for p in sorted(root.glob("predict_*.py"))])


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in _CELL_BORDER.split(row.strip().strip("|"))]


def input_rows(markdown: str) -> dict[str, str]:
    """Input name -> its row, from every table whose first header cell is `input`."""
    return {name: row for name, (row, _) in _input_table_rows(markdown).items()}


def input_default_cells(markdown: str) -> dict[str, str]:
    """Input name -> its row's `default` cell, in the input tables that have that column."""
    return {
        name: _cells(row)[column]
        for name, (row, column) in _input_table_rows(markdown).items()
        if column is not None
    }


def _input_table_rows(markdown: str) -> dict[str, tuple[str, int | None]]:
    rows: dict[str, tuple[str, int | None]] = {}
    in_table, column = False, None
    for line, visible in zip(markdown.split("\n"), prose(markdown).split("\n"), strict=True):
        if _INPUT_HEADER.match(visible):
            in_table = True
            headers = _cells(line)
            column = headers.index("default") if "default" in headers else None
        elif not visible.strip():
            in_table = False
        elif in_table and not _TABLE_DELIMITER.match(visible):
            first_cell = _cells(line)[0]
            rows.update((name, (line, column)) for name in _INPUT_NAME.findall(first_cell))
    return rows


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def bound_problems(declared: dict[str, dict], rows: dict[str, str]) -> list[str]:
    """Rows of inputs with `ge` and `le` that state neither `ge-le` nor `ge to le`."""
    problems = []
    for name, row in rows.items():
        rules = declared.get(name, {})
        if "ge" in rules and "le" in rules:
            low, high = _number(rules["ge"]), _number(rules["le"])
            if f"{low}-{high}" not in row and f"{low} to {high}" not in row:
                problems.append(f"{name}: the row does not say {low}-{high}: {row.strip()}")
    return problems


def choice_problems(declared: dict[str, dict], rows: dict[str, str]) -> list[str]:
    """Rows of inputs with choices that leave one of them out."""
    return [
        f"{name}: the row does not list `{choice}`: {row.strip()}"
        for name, row in rows.items()
        for choice in declared.get(name, {}).get("choices", [])
        if f"`{choice}`" not in row
    ]


_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])")


def _written(value) -> str:
    """A default as a table writes it: `false`, `""`, `none`, 6 (or 6.0), 0.8."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return _number(value)


def _states(cell: str, value) -> bool:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return any(float(number) == value for number in _NUMBER.findall(cell))
    return re.search(rf"(?<!\w){re.escape(_written(value))}(?!\w)", cell) is not None


def default_problems(declared: dict[str, dict], cells: dict[str, str]) -> list[str]:
    """Default cells that leave out a literal default a predictor declares. An input whose
    default is None (the variant's, a random seed, empty) is described in words, not checked."""
    return [
        f"{name}: the default cell does not say {_written(value)}: {cell}"
        for name, cell in cells.items()
        for value in dict.fromkeys(declared.get(name, {}).get("defaults", []))
        if value is not None and not _states(cell, value)
    ]


def _input_rows_of(page: str) -> dict[str, str]:
    return input_rows((ROOT / page).read_text(encoding="utf-8"))


def test_every_predictor_input_has_a_row_in_the_inputs_page():
    missing = set(predictor_inputs()) - set(_input_rows_of("docs/inputs.md"))
    assert not missing, f"not in docs/inputs.md's table: {sorted(missing)}"


@pytest.mark.parametrize("page", INPUT_TABLES)
def test_every_input_row_names_an_input_the_predictors_declare(page):
    unknown = set(_input_rows_of(page)) - set(predictor_inputs())
    assert not unknown, f"{page} documents inputs no predictor has: {sorted(unknown)}"


@pytest.mark.parametrize("page", INPUT_TABLES)
def test_every_input_row_states_the_bounds_the_predictors_declare(page):
    problems = bound_problems(predictor_inputs(), _input_rows_of(page))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", INPUT_TABLES)
def test_every_input_row_lists_the_choices_the_predictors_declare(page):
    problems = choice_problems(predictor_inputs(), _input_rows_of(page))
    assert not problems, "\n".join(problems)


def test_the_input_tables_are_found_on_every_page_that_has_one():
    assert {"README.md", "docs/inputs.md", "docs/lora.md"} <= set(INPUT_TABLES)


@pytest.mark.parametrize("page", INPUT_TABLES)
def test_every_input_row_states_the_defaults_the_predictors_declare(page):
    cells = input_default_cells((ROOT / page).read_text(encoding="utf-8"))
    problems = default_problems(predictor_inputs(), cells)
    assert not problems, "\n".join(problems)


# The README's variants table against cogvideox_cog.variants (no torch in that module).
_DTYPE_NAMES = {"float16": "fp16", "bfloat16": "bf16"}
_VARIANT_ID = re.compile(r"`([a-z0-9_.-]+)`")


def variant_rows(markdown: str) -> dict[str, dict[str, str]]:
    """Variant id -> {header: cell} from the table whose first header cell is
    `COGVIDEOX_MODEL`."""
    rows: dict[str, dict[str, str]] = {}
    headers: list[str] | None = None
    for line, visible in zip(markdown.split("\n"), prose(markdown).split("\n"), strict=True):
        cells = _cells(line) if "|" in visible else []
        if cells and cells[0] == "`COGVIDEOX_MODEL`":
            headers = cells
        elif headers is None or _TABLE_DELIMITER.match(visible):
            continue
        elif not cells:
            headers = None
        else:
            rows[_VARIANT_ID.findall(cells[0])[0]] = dict(zip(headers, cells, strict=True))
    return rows


def variant_problems(rows: dict[str, dict[str, str]], variants: dict) -> list[str]:
    """Rows that say otherwise than the variant's definition, and variants without a row."""
    problems = [f"{v}: no row" for v in variants if v not in rows]
    for name, row in rows.items():
        variant = variants.get(name)
        if variant is None:
            problems.append(f"{name}: no such variant")
            continue
        expected = {
            "predictor": variant.task,
            "fps": str(variant.fps),
            "dtype": _DTYPE_NAMES[variant.dtype],
            "dynamic CFG": "on" if variant.dynamic_cfg else "off",
        }
        problems += [
            f"{name}: {column} says {row.get(column)!r}, the variant {value!r}"
            for column, value in expected.items()
            if row.get(column) != value
        ]
        frames, cell = f"{variant.frame_step}N+1, up to {variant.max_frames}", row.get("frames", "")
        if not cell.startswith(frames):
            problems.append(f"{name}: frames says {cell!r}, not {frames}")
        if (
            variant.default_frames != variant.max_frames
            and f"({variant.default_frames})" not in cell
        ):
            problems.append(f"{name}: frames does not give the default {variant.default_frames}")
        if not row.get("scheduler", "").lower().startswith(variant.scheduler):
            problems.append(f"{name}: scheduler says {row.get('scheduler')!r}")
    return problems


def test_the_readmes_variants_table_says_what_each_variant_runs_with():
    from cogvideox_cog.variants import VARIANTS

    rows = variant_rows((ROOT / "README.md").read_text(encoding="utf-8"))
    problems = variant_problems(rows, VARIANTS)
    assert not problems, "\n".join(problems)


def undocumented_modules(markdown: str, package: Path) -> list[str]:
    """Modules of `package` whose file name the page's code blocks (its map) do not mention."""
    code = "\n".join(c for _, c in code_commands(markdown))
    return [
        path.relative_to(package).as_posix()
        for path in sorted(package.rglob("*.py"))
        if path.name != "__init__.py"
        and not re.search(rf"(?<![\w.]){re.escape(path.name)}(?!\w)", code)
    ]


def test_the_architecture_map_names_every_module_of_the_package():
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = undocumented_modules(page, ROOT / "cogvideox_cog")
    assert not missing, f"not in docs/architecture.md's map: {missing}"


# Files and modules the pages name in prose and code (`tests/test_settings.py`, `python -m
# cogvideox_cog.health`), not as links: a renamed one leaves a page pointing at nothing.
_REPO_PATH = re.compile(
    r"(?<![\w./~$-])((?:benchmarks|cogvideox_cog|deploy|docs|script|tests)/[\w./*-]*"
    r"|predict_[\w*]+\.py|cog(?:-[a-z0-9]+)?\.yaml|requirements(?:-dev)?\.txt)"
)
_OUR_MODULE = re.compile(r"\bpython3? -m (cogvideox_cog(?:\.\w+)*)")


def missing_names(source: Path, root: Path = ROOT) -> list[Problem]:
    """Repository paths (a glob must match something) and `python -m` modules of the package
    that a page names and the repository lacks. Paths from the repository root only; `../`
    links are the link check's."""
    problems = []
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        where = f"{source.relative_to(root)}:{number}"
        for match in _REPO_PATH.finditer(line):
            path = match[1].rstrip(".")
            if not (any(root.glob(path)) if "*" in path else (root / path).exists()):
                problems.append(Problem("name", where, path, "no such file or folder"))
        for match in _OUR_MODULE.finditer(line):
            module = root.joinpath(*match[1].split("."))
            if not (module.with_suffix(".py").is_file() or (module / "__main__.py").is_file()):
                problems.append(Problem("name", where, match[1], "no such runnable module"))
    return problems


def test_every_file_and_module_the_docs_name_exists():
    pages = [p for p in doc_files() if p.name != "CHANGELOG.md"]
    problems = [p for page in pages for p in missing_names(page)]
    assert not problems, _report(problems)


def test_the_readme_stays_a_short_read():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move details to docs/"


# The checker itself, on small made-up trees: it must fail on what it is meant to catch.


def _tree(tmp_path: Path, files: dict[str, str]) -> list[Path]:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return [tmp_path / name for name in files if name.endswith(".md")]


def test_a_link_to_a_missing_file_is_reported(tmp_path):
    files = _tree(tmp_path, {"README.md": "See [ops](docs/operation.md).\n", "docs/ops.md": ""})
    problems = check(files, tmp_path)
    assert [(p.kind, p.where, p.target) for p in problems] == [
        ("file", "README.md:1", "docs/operation.md")
    ]


def test_a_link_that_leaves_the_repository_is_reported(tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "outside.md").write_text("")
    files = _tree(tmp_path / "repo", {"README.md": "[x](../outside.md)\n"})
    assert [p.kind for p in check(files, tmp_path / "repo")] == ["file"]


def test_a_link_to_a_missing_heading_is_reported(tmp_path):
    files = _tree(
        tmp_path,
        {
            "README.md": "[a](docs/a.md#stopping) [b](docs/a.md#starting) [c](#intro) [d](#nope)\n"
            "\n# Intro\n",
            "docs/a.md": "## Stopping\n",
        },
    )
    problems = check(files, tmp_path)
    assert [(p.kind, p.target) for p in problems] == [
        ("anchor", "docs/a.md#starting"),
        ("anchor", "#nope"),
    ]


def test_links_to_folders_and_other_files_resolve(tmp_path):
    files = _tree(
        tmp_path,
        {
            "docs/a.md": "[k](../deploy/) [y](../deploy/k.yaml) [r](../README.md#top)\n",
            "deploy/k.yaml": "",
            "README.md": "# Top\n",
        },
    )
    assert check(files, tmp_path) == []


def test_web_links_and_links_inside_code_are_not_checked(tmp_path):
    files = _tree(
        tmp_path,
        {
            "README.md": "[web](https://example.com/x.md) [mail](mailto:a@example.com)\n"
            "`[not a link](missing.md)` and\n"
            "```\n[nor](this.md)\n```\n",
        },
    )
    assert check(files, tmp_path) == []


def test_reference_and_html_links_are_checked(tmp_path):
    files = _tree(
        tmp_path,
        {"README.md": '[ops][1]\n\n[1]: docs/gone.md\n<a href="gone.md">x</a>\n'},
    )
    assert [(p.where, p.target) for p in check(files, tmp_path)] == [
        ("README.md:3", "docs/gone.md"),
        ("README.md:4", "gone.md"),
    ]


@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        ("Memory and speed", "memory-and-speed"),
        ("What 1.0 means", "what-10-means"),
        ("`speed_mode`", "speed_mode"),
        ("`prompt` and `negative_prompt`", "prompt-and-negative_prompt"),
        ("Same frames as the model's authors", "same-frames-as-the-models-authors"),
        ("Asynchronous, with a webhook", "asynchronous-with-a-webhook"),
        ("Unreleased", "unreleased"),
        ("0.1.0 - 2026-11-29", "010---2026-11-29"),
        ("A [linked](x.md) heading", "a-linked-heading"),
    ],
)
def test_headings_become_anchors_by_githubs_rules(heading, expected):
    assert slug(heading) == expected


def test_a_repeated_heading_gets_a_numbered_anchor_and_html_ids_count():
    text = '# Notes\n## Notes\n## Notes\n<a id="files-in"></a>Text\n```\n# not a heading\n```\n'
    assert anchors(text) == {"notes", "notes-1", "notes-2", "files-in"}


def test_cog_predict_is_reported_in_prose_and_code_but_cog_run_is_not(tmp_path):
    text = "Run `cog predict -i x=1`.\n```\ncog -f cog-i2v.yaml predict\ncog run -i x=1\n```\n"
    [page] = _tree(tmp_path, {"page.md": text})
    problems = deprecated_cog_commands(page, tmp_path)
    assert [p.where for p in problems] == ["page.md:1", "page.md:3"]


def test_a_cog_run_without_a_long_setup_timeout_is_reported_in_code_but_not_in_prose(tmp_path):
    text = (
        "Run `cog run -i x=1`.\n```bash\n# cog run in a comment\ncog run -i x=1\n"
        "cog -f cog-i2v.yaml run \\\n  --setup-timeout 300 -i x=1\n"
        "cog run --setup-timeout 3600 -i x=1\ncog -f cog-v2v.yaml run --setup-timeout=900 \\\n"
        "  -i x=1\n```\n"
    )
    [page] = _tree(tmp_path, {"page.md": text})
    problems = short_setup_commands(page, tmp_path)
    assert [p.where for p in problems] == ["page.md:4", "page.md:5"]


def test_a_variant_row_that_differs_from_the_variant_is_reported():
    from cogvideox_cog.variants import VARIANTS

    table = (
        "| `COGVIDEOX_MODEL` | predictor | frames | fps | dtype | scheduler | dynamic CFG |\n"
        "|---|---|---|---|---|---|---|\n"
        "| `cogvideox-2b` | t2v | 8N+1, up to 49 | 8 | bf16 | DDIM | off |\n"
        "| `cogvideox1.5-5b` | t2v | 16N+1, up to 161 | 16 | bf16 | DPM | on |\n"
    )
    problems = variant_problems(variant_rows(table), VARIANTS)
    assert [p.split(":")[0] for p in problems] == [
        "cogvideox-5b",
        "cogvideox-5b-i2v",
        "cogvideox1.5-5b-i2v",
        "cogvideox-2b",
        "cogvideox1.5-5b",
    ]


def test_a_module_missing_from_the_map_is_reported(tmp_path):
    _tree(
        tmp_path, {"pkg/a.py": "", "pkg/sub/b.py": "", "pkg/sub/__init__.py": "", "pkg/ab.py": ""}
    )
    page = "`ab.py` in prose\n```\npkg/\n  a.py  the first\n  sub/  b.py (the second)\n```\n"
    assert undocumented_modules(page, tmp_path / "pkg") == ["ab.py"]


def test_a_named_file_glob_or_module_that_is_missing_is_reported(tmp_path):
    _tree(tmp_path, {"tests/test_a.py": "", "cogvideox_cog/health.py": "", "cog.yaml": ""})
    text = (
        "See `tests/test_a.py`, tests/test_b.py and [c](../tests/test_c.py).\n"
        "```\npython -m cogvideox_cog.health live\npython -m cogvideox_cog.probe\n```\n"
        "`tests/test_*.py`, `tests/test_e2e_*.py`, `cog.yaml` and `cog-x2v.yaml`.\n"
    )
    [page] = _tree(tmp_path, {"docs/page.md": text})
    problems = missing_names(page, tmp_path)
    assert [(p.where, p.target) for p in problems] == [
        ("docs/page.md:1", "tests/test_b.py"),
        ("docs/page.md:4", "cogvideox_cog.probe"),
        ("docs/page.md:6", "tests/test_e2e_*.py"),
        ("docs/page.md:6", "cog-x2v.yaml"),
    ]


def test_a_paragraph_written_right_under_a_table_is_reported(tmp_path):
    text = "| a | b |\n|---|---|\n| 1 | 2 |\nA paragraph.\n\n| c |\n|---|\n| 3 |\n"
    [page] = _tree(tmp_path, {"page.md": text})
    problems = table_problems(page, tmp_path)
    assert [(p.where, p.target) for p in problems] == [("page.md:4", "A paragraph.")]


def test_table_cells_count_escaped_pipes_as_text_and_skip_code_blocks(tmp_path):
    text = "| a | b |\n|:--|--:|\n| x \\| y | 2 |\n\n```\n| a | b |\n|---|---|\n| 1 |\n```\n"
    [page] = _tree(tmp_path, {"page.md": text})
    assert table_problems(page, tmp_path) == []


_PREDICTOR = """
class Predictor:
    def run(
        self,
        steps: int = Input(description="Steps.", ge=1, le=500, default=50),
        scale: float = Input(description="Scale.", ge=-1.0, le=0.5, default=0.0),
        mode: str = Input(description="Mode.", choices=["slow", "fast"], default="slow"),
        prompt: str = Input(description="Prompt."),
    ) -> str:
        return prompt
"""


def test_inputs_are_read_from_the_predictor_source_with_their_bounds_choices_and_defaults():
    assert declared_inputs([_PREDICTOR]) == {
        "steps": {"ge": 1, "le": 500, "defaults": [50]},
        "scale": {"ge": -1.0, "le": 0.5, "defaults": [0.0]},
        "mode": {"choices": ["slow", "fast"], "defaults": ["slow"]},
        "prompt": {},
    }


def test_an_input_row_with_another_default_is_reported():
    table = (
        "| input | type | default |\n|---|---|---|\n| `steps` | int 1-500 | 500 |\n"
        "| `scale` | float | 0.0 |\n| `mode` | `slow`, `fast` | `fast` |\n"
        "| `prompt` | string | required |\n"
    )
    problems = default_problems(declared_inputs([_PREDICTOR]), input_default_cells(table))
    assert [p.split(":")[0] for p in problems] == ["steps", "mode"]


def test_an_input_row_with_other_bounds_is_reported():
    table = (
        "| input | type |\n|---|---|\n| `steps` | int 1-50 |\n| `scale` | float -1 to 0.5 |\n"
        "| `prompt` | string |\n"
    )
    problems = bound_problems(declared_inputs([_PREDICTOR]), input_rows(table))
    assert [p.split(":")[0] for p in problems] == ["steps"]


def test_an_input_row_without_one_of_the_choices_is_reported():
    table = "| input | type |\n|---|---|\n| `mode` | `slow` or fast |\n"
    problems = choice_problems(declared_inputs([_PREDICTOR]), input_rows(table))
    assert problems == ["mode: the row does not list `fast`: | `mode` | `slow` or fast |"]


def test_input_rows_come_only_from_tables_headed_input_and_outside_code():
    text = (
        "| input | type |\n|---|---|\n| `steps`, `scale` | int |\n\n"
        "| metric | what |\n|---|---|\n| `seed` | x |\n\n"
        "```\n| input | type |\n|---|---|\n| `mode` | x |\n```\n"
    )
    assert set(input_rows(text)) == {"steps", "scale"}
