"""The scoring core, shared by the HTTP scorer, the stream scorer and the batch jobs.

Model artifacts (sha256-verified before unpickling), the model registry (fail closed), the
online feature lookup with training's TTL rule, the scorer and its compiled tree walker, the
served model set (champion, shadow or canary challenger), drift, and the prediction record and
log.  It imports the feature repo and nothing of the runtimes above it.
"""
