"""Local development infrastructure: the Tansu broker and the services `make up` starts, the
process helpers they use, and `make demo` (the whole system end to end on this machine).
It sits above the runtimes and may use all of them; nothing in a runtime imports it."""
