"""The online scorer: FastAPI app scoring transactions from Feast online features."""
