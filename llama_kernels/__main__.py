from .cli import main

if __name__ == "__main__":  # not when a spawned worker process (selftest --compile-workers) re-imports it
    raise SystemExit(main())
