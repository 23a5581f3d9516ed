"""`cybertron dashboard`: a web page over a folder of run directories (runs table, live metric curves) with a
chat playground against a running `cybertron serve`.

folder.py lists the runs and summarizes each from its files, tail.py reads metrics.jsonl incrementally,
proxy.py relays chat requests to the server, app.py is the FastAPI app and static/index.html the page.

The package reads run directories as plain files and never imports torch: the dashboard runs beside training on
the same machine, it only displays, and importing torch (through runs.py) would cost seconds at every start.
"""
