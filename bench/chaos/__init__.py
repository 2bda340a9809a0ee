"""The soak-and-chaos run: two brokers on Redis behind nginx, simulated stores, faults, and
the checks of what every observer saw (`python -m bench.chaos --help`).

One job per module: settings, processes (and the faults' signals), http_client, store
(the ERP's order book), mirror (a subscriber's copy of a channel), connection (a socket and
its requests), screen (a terminal's habits), run (the shared record), traffic, faults,
settle, then the checks (streams, views, payments, memory, lincheck), report and cli."""
