"""The inspector: a local page over the event store, live, with replay (`--inspector`).

- `reader.py`: the store read from a thread of the inspector's own, never the reactor;
- `feed.py`: requests pushed to open pages (Server-Sent Events) as the store writes them;
- `replay.py`: a captured request sent again through the proxy core;
- `web.py`: the twisted.web resource: the page, its JSON API, the feed, replay;
- `service.py`: the listeners and threads, as one service of the gateway's tree;
- `static/`: the page itself, plain HTML, CSS and JavaScript shipped as package data.
"""
