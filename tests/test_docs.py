"""The README and docs/ stay true: a short front page, links that resolve, and only commands and flags that exist and
that a test (or demo.py / gpu_check.py) runs. Parsers only: no model is built."""

import importlib
import re
import shlex
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser as torchrun_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 300
# What runs the documented commands (a string search for each flag in these files).
RUNNERS = [*sorted((ROOT / "tests").glob("test_*.py")), ROOT / "tests" / "helpers.py", ROOT / "demo.py",
           ROOT / "gpu_check.py"]
# Documented commands that cannot run here (a regular expression searched in the command line), each with the test that
# stands in for it. The flags of these commands are not searched for in the tests.
CANNOT_RUN_HERE = {
    r"^python training_vqgan\.py\s*(#|$)": "tests/test_vqgan.py::test_paper_config_at_256",  # the paper's size, a GPU
    r"^python training_transformer\.py\s*(#|$)": "tests/test_transformer.py::test_stage1_stage2_sampling_end_to_end",
    r"^python sample_transformer\.py\s*(#|$)": "tests/test_transformer.py::test_stage1_stage2_sampling_end_to_end",
    r"^python bench\.py\s*(#|$)": "tests/test_bench.py::test_quick_bench_runs_and_writes_json",  # the paper's config
    r"^python gpu_check\.py\s*(#|$)": "tests/test_gpu_check.py::test_every_planned_command_parses_in_its_script",
    r"--nproc_per_node [48] ": "tests/test_distributed.py::test_two_processes_train_like_one",  # 4 or 8 GPUs
    r"--nnodes 2": "tests/test_distributed.py::test_two_nodes_train_like_two_processes_on_one",  # two machines
    r"^srun ": "tests/test_distributed.py::test_stage2_as_two_slurm_tasks_with_token_cache_and_validation_split",
    r"--num-samples 50000": "tests/test_eval_transformer.py::test_eval_end_to_end_on_a_tiny_checkpoint",  # a data set
    r"vqgan_imagenet_f16": "tests/test_eval_vqgan.py::test_eval_on_a_taming_checkpoint",  # a released checkpoint
}
# Flags of other tools that docs name in prose (pytest's, TensorBoard's); the scripts' and torchrun's come from their
# parsers.
OTHER_TOOLS_FLAGS = {"--pdb", "--logdir"}
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "2>&1", "<"}


# ---- reading markdown ----

def split_code(text):
    """(prose lines, fenced code lines) of a markdown text; code blocks are ``` fences."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            code.append(line)
        else:
            prose.append(line)
    return prose, code


def code_spans(text):
    """The `code spans` of a markdown text's prose (a span may run across a line break)."""
    return re.findall(r"`([^`]+)`", " ".join(split_code(text)[0]))


def slug(heading):
    """GitHub's anchor for a heading: markup dropped, lower-case, punctuation but '-' and '_' removed, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    """The anchors of a page's headings (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen, result = {}, set()
    for line in split_code(path.read_text())[0]:
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            name = base if base not in seen else f"{base}-{seen[base]}"
            seen[base] = seen.get(base, 0) + 1
            result.add(name)
    return result


def link_targets(text):
    """Every link and image target in the prose of a page, code spans left out."""
    prose = re.sub(r"`[^`]*`", "", "\n".join(split_code(text)[0]))
    inline = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)
    reference = re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", prose, flags=re.M)
    html = re.findall(r"<(?:img|a)\s[^>]*(?:src|href)=\"([^\"]+)\"", prose)
    return inline + reference + html


def broken_links(path):
    """The relative links of a page whose file or #anchor does not exist, each with the reason."""
    broken = []
    for target in link_targets(path.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        file = (path.parent / file_part).resolve() if file_part else path
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {file.name}")
    return broken


# ---- reading commands ----

def logical_lines(lines):
    """Lines with their backslash continuations joined."""
    joined, current = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
        else:
            joined.append(current + line)
            current = ""
    return joined + ([current] if current else [])


def parse_command(line):
    """(script, script argv, torchrun argv or None) of a shell line running `python X.py ...` or `torchrun ... X.py`,
    else None."""
    if not re.search(r"\b(python3?|torchrun)\b.*\.py\b", line):
        return None
    tokens = shlex.split(line, comments=True)
    for i, token in enumerate(tokens):
        name = token.rsplit("/", 1)[-1]
        if name in ("python", "python3") and i + 1 < len(tokens) and tokens[i + 1].endswith(".py"):
            script, launcher, rest = tokens[i + 1], None, tokens[i + 2:]
            break
        if name == "torchrun":
            j = next(k for k in range(i + 1, len(tokens)) if tokens[k].endswith(".py"))
            script, launcher, rest = tokens[j], tokens[i + 1:j], tokens[j + 1:]
            break
    else:
        return None
    end = next((k for k, token in enumerate(rest) if token in SHELL_OPERATORS), len(rest))
    return script, rest[:end], launcher


def documented_commands():
    """(page, command line, script, argv, torchrun argv) of every command in the pages' code blocks, and of every code
    span in their prose that starts with python or torchrun."""
    commands = []
    for page in PAGES:
        text = page.read_text()
        spans = [span for span in code_spans(text) if re.match(r"(python3?|torchrun) ", span)]
        for line in logical_lines(split_code(text)[1]) + spans:
            parsed = parse_command(line)
            if parsed:
                commands.append((page.relative_to(ROOT), line.strip(), *parsed))
    return commands


def parser_of(script):
    """The argparse parser of a script in the repository root (its own build_parser)."""
    return importlib.import_module(Path(script).stem).build_parser()


def flags_of(argv):
    """The --flags of a command line, values left out (--name=value gives --name)."""
    return [token.split("=", 1)[0] for token in argv if token.startswith("--")]


def unknown_flags(parser, argv):
    """Flags that are not exactly an option of `parser` (argparse would accept an abbreviation)."""
    return [flag for flag in flags_of(argv) if flag not in parser._option_string_actions]


COMMANDS = documented_commands()


def command_id(command):
    return f"{command[0]}: {command[1][:70]}"


# ---- the checks ----

def test_readme_is_a_short_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; at most {MAX_README_LINES}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES[1:], ids=lambda p: p.name)
def test_each_docs_page_opens_with_a_title_and_a_sentence(page):
    lines = [line for line in page.read_text().splitlines() if line.strip()]
    assert lines[0].startswith("# "), f"{page.name} does not open with a '# ' title"
    assert not lines[1].startswith(("#", "```", "|", "!")), f"{page.name}: a sentence on what it is for comes first"


def test_the_documents_show_commands():
    scripts = {command[2] for command in COMMANDS}
    assert {"training_vqgan.py", "training_transformer.py", "sample_transformer.py", "eval_vqgan.py",
            "eval_transformer.py", "demo.py", "bench.py", "gpu_check.py"} <= scripts


@pytest.mark.parametrize("command", COMMANDS, ids=command_id)
def test_every_documented_command_parses_with_its_scripts_parser(command):
    page, line, script, argv, launcher = command
    assert (ROOT / script).is_file(), f"{page}: {script} does not exist"
    parser = parser_of(script)
    assert unknown_flags(parser, argv) == [], f"{page}: {line}"
    if "--help" not in argv and "-h" not in argv:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{page}: {script} does not parse: {line}")
    if launcher is not None:
        assert unknown_flags(torchrun_parser(), launcher) == [], f"{page}: {line}"
        torchrun_parser().parse_args([*launcher, script])


def test_every_flag_of_a_documented_command_is_run_by_a_test():
    sources = "\n".join(path.read_text() for path in RUNNERS)
    missing = set()
    for page, line, script, argv, launcher in COMMANDS:
        if any(re.search(pattern, line) for pattern in CANNOT_RUN_HERE):
            continue
        for flag in flags_of(argv + (launcher or [])):
            if not re.search(re.escape(flag) + r"(?![\w-])", sources):
                missing.add(f"{flag} ({page}: {script})")
    assert sorted(missing) == [], "flags no test, demo.py or gpu_check.py runs"


@pytest.mark.parametrize("pattern, stand_in", CANNOT_RUN_HERE.items())
def test_commands_that_cannot_run_here_have_a_stand_in_test(pattern, stand_in):
    assert any(re.search(pattern, command[1]) for command in COMMANDS), f"no documented command matches {pattern!r}"
    file, name = stand_in.split("::")
    assert re.search(rf"^def {name}\(", (ROOT / file).read_text(), flags=re.M), f"{stand_in} does not exist"


def test_flags_named_in_prose_exist():
    known = set(OTHER_TOOLS_FLAGS) | set(torchrun_parser()._option_string_actions)
    for script in {command[2] for command in COMMANDS}:
        known |= set(parser_of(script)._option_string_actions)
    stray = set()
    for page in PAGES:
        for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", " ".join(code_spans(page.read_text()))):
            if flag not in known:
                stray.add(f"{flag} ({page.name})")
    assert sorted(stray) == []


# ---- the checks can fail ----

def test_slug_follows_githubs_rule():
    assert slug("Speed: `bench.py`") == "speed-benchpy"
    assert slug("What is fixed compared with the usual simple re-implementations") == \
        "what-is-fixed-compared-with-the-usual-simple-re-implementations"
    assert slug("Stage 2 and sampling (EMA, top_k)") == "stage-2-and-sampling-ema-top_k"


def test_a_broken_link_and_a_missing_anchor_are_found(tmp_path):
    (tmp_path / "a.md").write_text("# A page\n\n## Its part\n\n```\n# not a heading\n```\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#its-part) [gone](missing.md) [no anchor](a.md#not-a-heading) `[code](x.md)`\n"
                    "[web](https://example.com)\n")
    assert broken_links(page) == [f"missing.md: no file {tmp_path / 'missing.md'}",
                                  "a.md#not-a-heading: no heading with the anchor #not-a-heading in a.md"]


def test_commands_are_read_across_continuations_and_after_launchers():
    lines = logical_lines(["OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 training_vqgan.py \\",
                           "  --device cpu --batch-size 2  # a comment", "python -m pytest", "python demo.py | tee x"])
    assert [parse_command(line) for line in lines] == [
        ("training_vqgan.py", ["--device", "cpu", "--batch-size", "2"], ["--standalone", "--nproc_per_node", "2"]),
        None, ("demo.py", [], None)]


def test_a_flag_that_does_not_exist_or_is_abbreviated_is_refused():
    parser = parser_of("sample_transformer.py")
    assert unknown_flags(parser, ["--top-k", "5", "--num-sample", "3", "--no-such-flag"]) == ["--num-sample",
                                                                                              "--no-such-flag"]
