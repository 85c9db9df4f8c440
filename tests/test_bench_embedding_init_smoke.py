"""benchmarks/bench_embedding_init.py runs end to end in --quick mode on the shipped teacher, and
the activation init moves the teacher's predictions far less than plain SVD at a high rank."""

from helpers import run_benchmark


def test_bench_embedding_init_quick():
    result = run_benchmark("bench_embedding_init.py", "--quick")
    assert "| factorization | rank 16 | rank 104 |" in result.stdout
    rows = {cells[0]: [float(c) for c in cells[1:]] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in result.stdout.splitlines()
             if line.startswith("| ") and not line.startswith("| factorization"))}
    assert list(rows) == ["plain SVD", "tied head's input Gram only", "token counts only", "both (the activation init)"]
    assert all(value >= 0 for values in rows.values() for value in values)
    plain, init = rows["plain SVD"], rows["both (the activation init)"]
    assert init[1] < plain[1] / 5  # rank 104 of 128: plain SVD drops directions the output projection reads
