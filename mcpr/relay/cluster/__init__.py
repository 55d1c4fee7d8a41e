"""Several relay nodes serving one domain (issue 14): a name directory shared through Redis
(`directory`), so that two nodes never serve the same name and a request reaching the wrong node
can be sent to the right one (`peers`)."""
