"""Offline and server-side batch inference over the OpenAI Batch file format.

* :mod:`~tritonvlm.batch.lines`: the input lines (``custom_id``, ``method``, ``url``, ``body``) and the
  output records (``id``, ``custom_id``, ``response``, ``error``), and what an output file already holds.
* :mod:`~tritonvlm.batch.inprocess`: the frontend's own request path (validation, media fetching, the
  Triton call, error mapping) called in process, so a batch line gets exactly the body
  ``/v1/chat/completions`` would give.
* :mod:`~tritonvlm.batch.scheduler`: bounded concurrency, an adjustable limit and preemption.
* :mod:`~tritonvlm.batch.priority`: interactive requests in flight, and the batch limit that follows.
* :mod:`~tritonvlm.batch.run_batch`: ``tritonvlm run-batch`` (resumable output file, progress bar).
* :mod:`~tritonvlm.batch.store` and :mod:`~tritonvlm.batch.worker`: the Batch API's SQLite store and the
  worker that runs accepted batches in the server.
"""
