"""People in the loop: a preference-annotation and blind human-evaluation web app (``preftune annotate``).

``items`` reads what ``preftune pairs`` and ``preftune eval --samples-out`` write; ``store`` keeps items,
assignments (the random left/right order) and votes in SQLite; ``server`` serves the page (Starlette on
uvicorn, loaded only when serving); ``results`` exports preference rows for ``preftune train`` and reports
agreement, position bias and the human win rate; ``stats`` holds the formulas. Nothing here imports torch.
"""
