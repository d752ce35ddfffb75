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

MODULES = ["abc", "argparse", "ast", "asyncio", "asyncio.events", "asyncio.streams", "asyncio.tasks", "base64", "bdb",
           "bisect", "bz2", "calendar", "cmd", "code", "codecs", "collections", "concurrent.futures", "configparser",
           "contextlib", "copy", "csv", "ctypes", "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest",
           "email", "email.message", "email.utils", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib",
           "functools", "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html.parser",
           "http.client", "http.cookiejar", "http.server", "imaplib", "importlib", "inspect", "io", "ipaddress",
           "itertools", "json", "linecache", "locale", "logging", "logging.handlers", "lzma", "mailbox", "mimetypes",
           "modulefinder", "multiprocessing", "multiprocessing.pool", "netrc", "numbers", "operator", "optparse", "os",
           "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile",
           "pstats", "pydoc", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve",
           "shlex", "shutil", "signal", "site", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "stat",
           "statistics", "string", "struct", "subprocess", "symtable", "sysconfig", "tabnanny", "tarfile", "tempfile",
           "textwrap", "threading", "timeit", "token", "tokenize", "trace", "traceback", "tracemalloc", "turtle",
           "types", "typing", "unittest", "unittest.mock", "urllib.parse", "urllib.request", "uuid", "venv",
           "warnings", "wave", "weakref", "webbrowser", "xml.dom.minidom", "xml.etree.ElementTree", "xmlrpc.client",
           "zipapp", "zipfile", "zipimport", "zoneinfo"]
LIMIT = 4096
SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
OK = re.compile(r"^[A-Z][A-Za-z ,;:'()-]+[a-z][.!?]$")


def docstrings(module):
    """The module's docstring, its classes' and functions', and the methods of classes it defines."""
    yield inspect.getdoc(module) or ""
    for _, obj in inspect.getmembers(module):
        if inspect.isclass(obj) or inspect.isfunction(obj):
            yield inspect.getdoc(obj) or ""
        if inspect.isclass(obj) and obj.__module__ == module.__name__:
            for _, method in inspect.getmembers(obj):
                if inspect.isfunction(method) or inspect.ismethoddescriptor(method):
                    yield inspect.getdoc(method) or ""


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
    out.write_text("\n".join(sentences[:LIMIT]) + "\n")
    print(f"{min(len(sentences), LIMIT)} sentences -> {out}")


if __name__ == "__main__":
    main()
