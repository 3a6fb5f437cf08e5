#!/usr/bin/env python3
"""Compares the machine code of two trees, kernel by kernel, from two KILN_JIT_DUMP folders.

A refactor that must not change behaviour should leave every kernel's instruction stream as it
was, up to register numbers and label names. Dump both trees (the variants test compiles every
registered variant for sm_80 and sm_90a; nvdisasm or cuobjdump must be on PATH for the .sass):

    git stash  # or check out the old tree, then build it
    KILN_JIT_DUMP=/tmp/sass/before build/test/tests/kiln_tests \\
        --gtest_filter='VariantsCompileTest.EveryVariant*'
    git stash pop  # the new tree, built
    KILN_JIT_DUMP=/tmp/sass/after build/test/tests/kiln_tests \\
        --gtest_filter='VariantsCompileTest.EveryVariant*'
    dev/jit/compare_sass.py /tmp/sass/before /tmp/sass/after [--kernel REGEX] [--diff N]

For each specialization in both folders (same file stem: kernel, arch and key hash) it prints the
instruction count before and after and whether the streams are
  same      identical once register numbers (R, UR, P, UP, B) and labels are erased;
  same mix  the same multiset of instructions (opcode and normalized operands), another order;
  differs   otherwise, with the opcodes whose counts moved (and, with --diff N, the first N
            lines of a unified diff of the normalized streams).
Barriers (BAR, SYNCS), memory operations (LD*, ST*, UTMA*, ATOM*, RED) and tensor-core
instructions (HMMA, HGMMA) are opcodes like any other: a moved one shows up in the counts.
Exit status 1 when any specialization differs (or is only in one folder), else 0.
"""

import argparse
import collections
import difflib
import pathlib
import re
import sys

INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.+?)\s*;")
TEXT_SECTION = re.compile(r"^\s*\.section\s+\.text\.(\S+?),")
OTHER_SECTION = re.compile(r"^\s*\.section\s+")
REGISTERS = [
    (re.compile(r"\bUR\d+\b"), "UR"),
    (re.compile(r"\bR\d+\b"), "R"),
    (re.compile(r"\bUP[0-6]\b"), "UP"),
    (re.compile(r"\bP[0-6]\b"), "P"),
    (re.compile(r"\bB(?:[0-9]|1[0-5])\b"), "B"),
    (re.compile(r"\.L_x_\d+"), "L"),
]


def normalize(instruction):
    for pattern, name in REGISTERS:
        instruction = pattern.sub(name, instruction)
    return " ".join(instruction.split())


def functions(sass_file):
    """{function name: [normalized instruction]} of every .text section of an nvdisasm listing."""
    result = {}
    current = None
    for line in sass_file.read_text().splitlines():
        section = TEXT_SECTION.match(line)
        if section:
            current = result.setdefault(section.group(1), [])
            continue
        if OTHER_SECTION.match(line):
            current = None
            continue
        instruction = INSTRUCTION.match(line)
        if current is not None and instruction:
            current.append(normalize(instruction.group(1)))
    return result


def opcode(instruction):
    words = instruction.split()
    if words[0].startswith("@"):  # predicate guard
        words = words[1:]
    return words[0] if words else ""


def describe(stem, folder):
    """The specialization (first line of the dumped .cu) of a dump stem."""
    source = folder / (stem + ".cu")
    if source.exists():
        with source.open() as f:
            line = f.readline()
        return line[3:].split(" (")[0].strip()
    return stem


def compare(before, after, kernel, diff_lines):
    stems_before = {p.stem for p in before.glob("*.sass")}
    stems_after = {p.stem for p in after.glob("*.sass")}
    stems = sorted(stems_before | stems_after)
    if kernel:
        stems = [s for s in stems if re.search(kernel, describe(s, before) + " " + s)]
    failures = 0
    totals = collections.Counter()
    for stem in stems:
        name = describe(stem, before if stem in stems_before else after)
        if stem not in stems_before or stem not in stems_after:
            print(f"only in {'after' if stem in stems_after else 'before'}: {name}")
            failures += 1
            continue
        old = functions(before / (stem + ".sass"))
        new = functions(after / (stem + ".sass"))
        for function in sorted(set(old) | set(new)):
            a, b = old.get(function, []), new.get(function, [])
            if a == b:
                verdict = "same"
            elif collections.Counter(a) == collections.Counter(b):
                verdict = "same mix"
            else:
                verdict = "differs"
                failures += 1
            totals[verdict] += 1
            print(f"{verdict:8} {len(a):6} -> {len(b):6}  {name}")
            if verdict == "differs":
                ops_a = collections.Counter(map(opcode, a))
                ops_b = collections.Counter(map(opcode, b))
                moved = {op: ops_b[op] - ops_a[op] for op in ops_a | ops_b if ops_a[op] != ops_b[op]}
                print("         opcodes: " +
                      ", ".join(f"{op} {d:+d}" for op, d in sorted(moved.items())) or "(none)")
                if diff_lines:
                    lines = list(difflib.unified_diff(a, b, "before", "after", lineterm="", n=1))
                    for line in lines[:diff_lines]:
                        print("           " + line)
    print(f"{len(stems)} specializations: " +
          ", ".join(f"{count} {verdict}" for verdict, count in sorted(totals.items())))
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=pathlib.Path, help="KILN_JIT_DUMP folder of the old tree")
    parser.add_argument("after", type=pathlib.Path, help="KILN_JIT_DUMP folder of the new tree")
    parser.add_argument("--kernel", help="only specializations whose name matches this regex")
    parser.add_argument("--diff", type=int, default=0, help="print N lines of each differing diff")
    args = parser.parse_args()
    return 1 if compare(args.before, args.after, args.kernel, args.diff) else 0


if __name__ == "__main__":
    sys.exit(main())
