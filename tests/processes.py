"""Running one test function in two spawned processes at once (concurrent-writer tests)."""
import multiprocessing


def run_in_two_processes(target, args_of) -> list:
    """Start `target(*args_of(i), barrier, results)` in two spawned processes; each puts one result
    on `results` after waiting at `barrier` (so they run at once). Returns both results; fails if a
    process does not exit cleanly."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=target, args=(*args_of(i), barrier, results)) for i in range(2)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=300) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    return outcomes
