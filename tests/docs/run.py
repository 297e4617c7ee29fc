#!/usr/bin/env python3
"""Runs the SQL examples of keypal's documentation, as a reader would paste them.

For each Markdown file given, every fenced block whose info string starts with `sql` runs,
in order, in one psql session against a fresh database holding the extension (psql
variables set by `\\gset` carry over, as in a reader's session). A block is:

    ```sql            must run without an error
    ```sql error      one statement that must fail (`sql error 22023`: with that SQLSTATE)

A fenced block right after a `sql` block (only blank lines between) whose info string is
`output` is what that block prints; it is compared line by line (trailing spaces ignored;
`…` in an expected line stands for any text). For an `sql error` block the output is the
error, as psql shows it: `ERROR:  <message>`.

Usage: run.py [--keep] FILE.md|FILE.sql ...   (PGHOST/PGPORT/PGUSER say where; prints TAP;
a .sql file runs whole, as one block)
"""
import os
import re
import subprocess
import sys

FENCE = re.compile(r"^```(.*)$")
MARK = "@@keypal-doc-block@@"


def blocks(path):
    """(line number, info, text) of every fenced block, in order."""
    out, info, start, body = [], None, 0, []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for n, line in enumerate(lines, 1):
        m = FENCE.match(line)
        if m and info is None:
            info, start, body = m.group(1).strip(), n, []
        elif line.strip() == "```" and info is not None:
            out.append((start, info, "\n".join(body), n))
            info = None
        elif info is not None:
            body.append(line)
    return out, lines


def statements_end(text):
    """Whether the block's last statement is ended (by `;` or a psql meta-command)."""
    code = [l.split("--")[0].rstrip() for l in text.split("\n")]
    code = [l for l in code if l.strip()]
    return not code or code[-1].endswith(";") or re.search(r"\\[a-z]+", code[-1]) is not None


def examples(path):
    """The sql blocks with what they expect: (line, must_fail, sqlstate, sql, expected output
    or None), and the problems of the file's fences (an output block after no sql block, a
    block whose statement is not ended, an error block of several statements)."""
    if path.endswith(".sql"):   # a script (scripts/try.sh's demo): one block, run whole
        with open(path, encoding="utf-8") as f:
            return [(1, False, None, f.read(), None)], []
    found, lines = blocks(path)
    result, problems = [], []
    for i, (start, info, text, end) in enumerate(found):
        words = info.split()
        if info == "output":
            prev = found[i - 1] if i else None
            between = lines[prev[3]:start - 1] if prev else []
            if not prev or prev[1].split()[:1] != ["sql"] or any(l.strip() for l in between):
                problems.append(f"{path}:{start}: an output block must follow a sql block directly")
            continue
        if not words or words[0].lower() not in ("sql", "psql"):
            continue
        if words[0] != "sql":
            problems.append(f"{path}:{start}: write the info string as sql")
        must_fail = len(words) > 1 and words[1] == "error"
        sqlstate = words[2] if must_fail and len(words) > 2 else None
        if not statements_end(text):
            problems.append(f"{path}:{start}: the block's last statement has no ';'")
        if must_fail and sum(l.split("--")[0].rstrip().endswith(";") for l in text.split("\n")) != 1:
            problems.append(f"{path}:{start}: an error block holds exactly one statement")
        expected = None
        if i + 1 < len(found):
            nstart, ninfo, ntext, _ = found[i + 1]
            between = lines[end:nstart - 1]
            if ninfo == "output" and all(not l.strip() for l in between):
                expected = ntext
        result.append((start, must_fail, sqlstate, text, expected))
    return result, problems


def script(exs):
    parts = ["\\set ON_ERROR_STOP 1"]
    for i, (_, must_fail, _, text, _) in enumerate(exs):
        parts.append(f"\\echo {MARK} {i}")
        if must_fail:
            parts += ["\\set ON_ERROR_STOP 0", "\\set ERROR false", text,
                      f"\\echo {MARK} {i} error :ERROR :LAST_ERROR_SQLSTATE",
                      "\\echo ERROR:  :LAST_ERROR_MESSAGE", "\\set ON_ERROR_STOP 1"]
        else:
            parts.append(text)
    parts.append(f"\\echo {MARK} end")
    return "\n".join(parts) + "\n"


def matches(want, got):
    w = [l.rstrip() for l in want.strip("\n").split("\n")]
    g = [l.rstrip() for l in got.strip("\n").split("\n")]
    if len(w) != len(g):
        return False
    for a, b in zip(w, g):
        pattern = "^" + ".*".join(re.escape(p) for p in a.split("…")) + "$"
        if not re.match(pattern, b):
            return False
    return True


def psql(*args, stdin=None):
    return subprocess.run(["psql", "-X", "-q", *args], input=stdin, capture_output=True, text=True)


def main():
    args = sys.argv[1:]
    keep = "--keep" in args
    files = [a for a in args if a != "--keep"]
    n, failed = 0, 0

    def tap(ok, what, detail=""):
        nonlocal n, failed
        n += 1
        print(("ok" if ok else "not ok") + f" {n} - {what}")
        if not ok:
            failed += 1
            for line in detail.rstrip().split("\n"):
                print("#   " + line)

    for path in files:
        exs, problems = examples(path)
        tap(not problems, f"{path}: its examples are well formed", "\n".join(problems))
        if not exs:
            continue
        db = "keypal_docs_" + re.sub(r"[^a-z0-9]+", "_", os.path.basename(path).lower())
        psql("-d", "postgres", "-c", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        r = psql("-d", "postgres", "-c", f"CREATE DATABASE {db}")
        r2 = psql("-d", db, "-c", "CREATE EXTENSION keypal")
        if r.returncode or r2.returncode:
            tap(False, f"{path}: a fresh database with keypal", r.stderr + r2.stderr)
            continue
        run = psql("-d", db, "-v", "ON_ERROR_STOP=1", stdin=script(exs))
        # What each block printed, by its marker.
        printed, current = {}, None
        errors = {}
        for line in run.stdout.split("\n"):
            if line.startswith(MARK):
                words = line.split()
                if len(words) >= 3 and words[2] == "error":
                    errors[int(words[1])] = (words[3] if len(words) > 3 else "", words[4] if len(words) > 4 else "")
                    continue
                current = words[1]
                if current != "end":
                    printed[int(current)] = []
                continue
            if current not in (None, "end"):
                printed[int(current)].append(line)
        reached_end = current == "end"
        tap(run.returncode == 0 or not reached_end, f"{path}: psql ends cleanly",
            f"psql exited {run.returncode}\n{run.stderr}")
        for i, (line, must_fail, sqlstate, text, expected) in enumerate(exs):
            where = f"{path}:{line}"
            if i not in printed:
                tap(False, f"{where} runs", "not reached: an earlier block failed")
                continue
            out = "\n".join(printed[i])
            last = i == max(printed) and not reached_end
            if must_fail:
                err = errors.get(i, ("false", ""))
                ok = err[0] == "true" and (sqlstate is None or err[1] == sqlstate)
                tap(ok, f"{where} fails as shown (SQLSTATE {err[1] or '-'})",
                    "the block ran without an error" if err[0] != "true"
                    else f"SQLSTATE {err[1]}, not {sqlstate}")
            else:
                tap(not last, f"{where} runs", run.stderr if last else "")
                if last:
                    continue
            if expected is not None:
                if must_fail:
                    # (\echo joins its words with one space: psql's own line has two)
                    out = "\n".join(re.sub(r"^ERROR: +", "ERROR:  ", l) for l in printed[i] if l.startswith("ERROR:"))
                tap(matches(expected, out), f"{where} prints what the doc shows",
                    "doc shows:\n" + expected + "\nprinted:\n" + out)
        if not keep:
            psql("-d", "postgres", "-c", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    print(f"1..{n}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
