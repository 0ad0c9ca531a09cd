"""The ``pacsflow`` command line (typer). The only place that configures logging."""
