#!/usr/bin/env python3
"""Chooses a small committed corpus from a large one (docs/operations.md, "Fuzzing").

libFuzzer's own minimisation (`cargo fuzz cmin`) keeps every input that adds a feature, which is
thousands of files here. This keeps the inputs of the --keep directories (the hand-made seeds),
then adds, greedily, the input that covers the most edges not yet covered, up to --max files.

    <fuzz binary> -merge=1 -merge_control_file=ctl EMPTY_DIR SEEDS_DIR GROWN_DIR...
    fuzz/select_corpus.py ctl --keep SEEDS_DIR --max 250 --out fuzz/corpus/<target>
"""
import argparse
import os
import shutil


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("control_file", help="a libFuzzer -merge_control_file written by a finished merge")
    ap.add_argument("--keep", action="append", default=[], help="a directory whose inputs are always kept")
    ap.add_argument("--max", type=int, default=250, help="files at most")
    ap.add_argument("--out", required=True, help="the directory to fill (emptied first)")
    a = ap.parse_args()

    lines = open(a.control_file).read().split("\n")
    n = int(lines[0])
    files = lines[2 : 2 + n]
    cov = {}
    for line in lines[2 + n :]:
        parts = line.split()
        if parts and parts[0] == "COV":
            cov[int(parts[1])] = set(map(int, parts[2:]))
    universe = set().union(*cov.values()) if cov else set()

    keep_dirs = [os.path.normpath(d) + os.sep for d in a.keep]
    chosen = [i for i in cov if any(os.path.normpath(files[i]).startswith(d) for d in keep_dirs)]
    covered = set().union(*(cov[i] for i in chosen)) if chosen else set()
    rest = {i: c for i, c in cov.items() if i not in set(chosen)}
    while rest and len(chosen) < a.max:
        i = max(rest, key=lambda i: (len(rest[i] - covered), -os.path.getsize(files[i])))
        gain = rest.pop(i) - covered
        if not gain:
            break
        covered |= gain
        chosen.append(i)

    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    for i in chosen:
        shutil.copy(files[i], os.path.join(a.out, os.path.basename(files[i])))
    size = sum(os.path.getsize(files[i]) for i in chosen)
    pct = 100 * len(covered) / len(universe) if universe else 100
    print(f"{len(chosen)} files, {size} bytes, {len(covered)}/{len(universe)} edges ({pct:.1f}%)")


if __name__ == "__main__":
    main()
