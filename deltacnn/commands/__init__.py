"""The commands behind the `deltacnn` command line, one module each: `run`, `tune`, `bench`
(shared pieces in `common`). `deltacnn.tools` re-exports their Python API."""
