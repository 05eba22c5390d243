"""The evaluation layer: the task registry, the benchmark runner, the results store and the reports.

``registry`` lists the tasks (one ``TaskSpec`` each); ``front`` runs one task from its options (the
task commands and the runner both go through it); ``runner`` plans and runs backbones x tasks;
``store`` is the append-only ``results.jsonl`` of a benchmark; ``tables`` and ``plots`` render it.
Modules are imported on use: importing this package costs nothing.
"""
