"""Regenerate sfa_compile/data/sentences.txt: real English sentences from CPython's standard-library
docstrings (offline, PSF-licensed text), used as calibration and held-out text. Deterministic for a given
Python version; the committed file was made with CPython 3.11.

    python benchmarks/make_sentences.py
"""

import importlib
import inspect
import pathlib
import random
import re

MODULES = ["argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "fractions", "functools",
           "gzip", "http.client", "imaplib", "inspect", "json", "logging", "mailbox", "multiprocessing", "optparse",
           "os", "pathlib", "pickle", "pydoc", "random", "shutil", "smtplib", "socket", "statistics", "string",
           "subprocess", "tarfile", "tempfile", "textwrap", "threading", "turtle", "typing", "unittest",
           "urllib.request", "uuid", "wave", "zipfile"]
SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
OK = re.compile(r"^[A-Z][A-Za-z ,;:'()-]+[a-z][.!?]$")


def docstrings(module):
    yield inspect.getdoc(module) or ""
    for _, obj in inspect.getmembers(module):
        if inspect.isclass(obj) or inspect.isfunction(obj):
            yield inspect.getdoc(obj) or ""


def main():
    seen, sentences = set(), []
    for name in MODULES:
        for doc in docstrings(importlib.import_module(name)):
            for sentence in SENTENCE.split(" ".join(doc.split())):
                words = sentence.split()
                if 8 <= len(words) <= 40 and OK.match(sentence) and sentence not in seen:
                    seen.add(sentence)
                    sentences.append(sentence)
    random.Random(0).shuffle(sentences)
    out = pathlib.Path(__file__).resolve().parents[1] / "sfa_compile" / "data" / "sentences.txt"
    out.write_text("\n".join(sentences[:2048]) + "\n")
    print(f"{min(len(sentences), 2048)} sentences -> {out}")


if __name__ == "__main__":
    main()
