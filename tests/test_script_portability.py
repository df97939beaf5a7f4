"""The scripts in script/ run under macOS's /bin/bash, bash 3.2.

No bash 3.2 is installed here to run them with, so each script is read for the constructs
that bash 3.2 lacks or that fail there. The one that passes unseen under a newer bash: with
`set -u`, expanding an empty array ("${args[@]}") stops a script with "unbound variable" in
bash before 4.4. They are read, too, for the GNU tools and options that macOS's own tools
lack (test_setup_script.py runs script/setup with those tools alone on its PATH).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import PROJECT

SCRIPTS = sorted(path for path in (PROJECT / "script").iterdir() if path.is_file())

# What bash 3.2 lacks, with the bash version that brought it.
NEWER_THAN_3_2 = {
    r"\b(declare|local|typeset)\s+-\w*[An]": "associative arrays or namerefs (4.0, 4.3)",
    r"\$\{\w+(\[[^]]*\])?(,,?|\^\^?)": "case conversion ${x,,} / ${x^^} (4.0)",
    r"\b(mapfile|readarray|coproc)\b": "mapfile, readarray, coproc (4.0)",
    r"(\[\[|\[|\btest)\s+-v\s": "-v NAME to test a variable is set (4.2)",
    r";;?&": "case fall-through ;& or ;;& (4.0)",
    r"&>>|\|&": "&>> or |& redirections (4.0)",
    r"\$\{\w+@\w\}": "${x@Q} transformations (4.4)",
    r"\bshopt\s+-s\s+(globstar|lastpipe|autocd|direxpand)": "shopt options from 4.x",
    r"\bwait\s+-n\b": "wait -n (4.3)",
    r"\{\w+\}[<>]": "exec {fd}> file descriptor variables (4.1)",
    r"\$(BASHPID|EPOCHSECONDS|EPOCHREALTIME)\b": "$BASHPID, $EPOCH* (4.0, 5.0)",
}

# What macOS lacks of GNU's tools and options, with what it has.
GNU_ONLY = {
    r"\b(md5|sha\d+)sum\b": "md5sum, shaNsum (macOS: md5, shasum -a N)",
    r"(?m)(^|[;&|(`]|\$\()\s*(nproc|timeout|realpath)\b": "nproc, timeout, realpath (coreutils)",
    r"\breadlink\s+(-\w+\s+)*-\w*[fem]": "readlink -f/-e/-m (macOS before 12.3 lacks -f)",
    r"\bsed\b[^|;&]*\s-i(\s|$)": "sed -i without a suffix (GNU and BSD read it apart)",
    r"\bstat\s+(-\w+\s+)*(-\w*c\b|--format|--printf)": "stat -c (macOS: stat -f)",
    r"\bdate\s+(-\w+\s+)*(-\w*d\b|--date)": "date -d (macOS: date -j -f)",
    r"\bgrep\s+(-\w+\s+)*-\w*P": "grep -P",
    r"\bfind\b.*\s-printf\b": "find -printf",
    r"\bmktemp\b.*\s--\w": "mktemp's long options (--tmpdir, --suffix)",
}

# ${name[@]+"${name[@]}"}: nothing when the array is empty, under any bash and set -u.
GUARDED_ARRAY = re.compile(r'\$\{(\w+)\[@\]\+"\$\{\1\[@\]\}"\}')
ARRAY_EXPANSION = re.compile(r"\$\{\w+\[[@*]\]\}")


def _code(path: Path) -> str:
    """The script without its comments (a # at the start of a word starts one)."""
    return "\n".join(re.sub(r"(^|\s)#.*", "", line) for line in path.read_text().splitlines())


def test_every_script_is_checked():
    assert {path.name for path in SCRIPTS} >= {"setup", "demo", "test", "lint", "serve"}
    assert all(path.read_text().startswith("#!/usr/bin/env bash\n") for path in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_no_script_uses_what_bash_3_2_lacks(script):
    code = _code(script)
    found = {
        why: m.group(0)
        for pattern, why in NEWER_THAN_3_2.items()
        if (m := re.search(pattern, code))
    }
    assert not found, f"script/{script.name}: {found}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_no_script_runs_what_macos_lacks(script):
    code = _code(script)
    found = {
        why: m.group(0) for pattern, why in GNU_ONLY.items() if (m := re.search(pattern, code))
    }
    assert not found, f"script/{script.name}: {found}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_arrays_are_expanded_so_that_an_empty_one_passes_set_u_in_bash_3_2(script):
    bare = ARRAY_EXPANSION.findall(GUARDED_ARRAY.sub("", _code(script)))
    assert not bare, f'script/{script.name}: use ${{a[@]+"${{a[@]}}"}} instead of {bare}'


@pytest.mark.parametrize(
    ("line", "newer"),
    [
        ("declare -A seen=()", True),
        ('echo "${name,,}"', True),
        ("mapfile -t lines <file", True),
        ('[[ -v COGVIDEOX_MODEL ]] && echo "$COGVIDEOX_MODEL"', True),
        ("  a) echo a ;&", True),
        ("exec {log}>out.txt", True),
        ('found+=("$candidate")', False),
        ('[[ "$1" =~ ^3\\.11\\.([0-9]+)$ ]] && [ "${BASH_REMATCH[1]}" -ge 2 ]', False),
        ('[ $# -gt 0 ] && value=${value#"${value%%[![:space:]]*}"}', False),
    ],
)
def test_the_checks_tell_newer_constructs_from_old_ones(tmp_path, line, newer):
    """The patterns catch what they are for, and not what bash 3.2 runs."""
    script = tmp_path / "script"
    script.write_text(f"#!/usr/bin/env bash\n{line}\n")
    code = _code(script)
    assert any(re.search(pattern, code) for pattern in NEWER_THAN_3_2) == newer


@pytest.mark.parametrize(
    ("line", "gnu"),
    [
        ("wanted=$(cat requirements.txt | sha256sum | cut -d' ' -f1)", True),
        ('root=$(readlink -f "$0")', True),
        ("sed -i 's/a/b/' file", True),
        ("sed -i '' 's/a/b/' file", True),
        ('size=$(stat -c %s "$file")', True),
        ("date -d yesterday", True),
        ("grep -qP '\\d+' file", True),
        ("jobs=$(nproc)", True),
        ("timeout 5 python -c pass", True),
        ("exec python -m cogvideox_cog.health --timeout 5", False),
        ("dir=$(mktemp -d --tmpdir cog.XXXXXX)", True),
        ("sed -i.bak 's/a/b/' file", False),
        ("shasum -a 256 file", False),
        ('root=$(readlink "$0")', False),
        ('cd "$(dirname "$0")/.."', False),
        ('exec python -m cog.server.http --host 127.0.0.1 "$@"', False),
        ('dir=$(mktemp -d "${TMPDIR:-/tmp}/cog.XXXXXX")', False),
    ],
)
def test_the_checks_tell_gnu_only_tools_from_portable_ones(tmp_path, line, gnu):
    script = tmp_path / "script"
    script.write_text(f"#!/usr/bin/env bash\n{line}\n")
    code = _code(script)
    assert any(re.search(pattern, code) for pattern in GNU_ONLY) == gnu


@pytest.mark.parametrize(
    ("line", "flagged"),
    [
        ('exec python "${args[@]}" "$@"', True),
        ('echo "${found[*]}"', True),
        ('exec python ${args[@]+"${args[@]}"} "$@"', False),
        ('echo "found: ${found[*]:-none}"', False),
    ],
)
def test_the_array_check_flags_only_unguarded_expansions(tmp_path, line, flagged):
    script = tmp_path / "script"
    script.write_text(f"#!/usr/bin/env bash\n{line}\n")
    assert bool(ARRAY_EXPANSION.findall(GUARDED_ARRAY.sub("", _code(script)))) == flagged
