"""The README teaches the script as it is: its walkthrough's code is the script's own, step by step,
and the lesson stays one short block near the top of the file."""
import ast
import re
import textwrap

from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
SCRIPT = (ROOT / "fine_tune_lora.py").read_text(encoding="utf-8")


def walkthrough():
    """{step heading: [python code blocks]} from the README's numbered step headings ("### 1. ...")."""
    steps = {}
    for match in re.finditer(r"^### (\d\. .+?)\n(.*?)(?=^#{2,3} )", README, re.M | re.S):
        steps[match.group(1)] = re.findall(r"```python\n(.*?)```", match.group(2), re.S)
    return steps


def test_every_walkthrough_excerpt_is_in_the_script_verbatim():
    steps = walkthrough()
    assert len(steps) == 6 and all(steps.values()), steps.keys()
    for heading, blocks in steps.items():
        for block in blocks:
            # copied from inside fine_tune(), so indented there by 4 or 8 spaces
            assert any(textwrap.indent(block, " " * n) in SCRIPT for n in (0, 4, 8)), f"{heading}:\n{block}"


def test_the_lessons_numbered_steps_are_the_walkthroughs_headings():
    lesson = next(f for f in ast.parse(SCRIPT).body if isinstance(f, ast.FunctionDef) and f.name == "fine_tune")
    lines = SCRIPT.splitlines()[lesson.lineno - 1:lesson.end_lineno]
    numbered = [line.strip()[2:] for line in lines if re.match(r"\s+# \d\. ", line)]
    assert numbered == list(walkthrough()), numbered


def test_the_lesson_is_one_short_block_near_the_top_and_no_helper_is_long():
    functions = [f for f in ast.walk(ast.parse(SCRIPT)) if isinstance(f, ast.FunctionDef)]
    lesson = next(f for f in functions if f.name == "fine_tune")
    assert lesson.lineno <= 160 and lesson.end_lineno - lesson.lineno + 1 <= 120
    longest = max((f for f in functions if f is not lesson), key=lambda f: f.end_lineno - f.lineno)
    assert longest.end_lineno - longest.lineno + 1 <= 60, longest.name
    # the calls every LoRA tutorial shows are in the lesson itself, not hidden in helpers
    called = {getattr(n.func, "attr", getattr(n.func, "id", None)) for n in ast.walk(lesson) if isinstance(n, ast.Call)}
    assert {"from_pretrained", "LoraConfig", "get_peft_model", "print_trainable_parameters", "TrainingArguments",
            "train", "evaluate", "save_pretrained"} <= called
