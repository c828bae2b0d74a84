"""The front end: from a user's prompt to an engine request, and from engine outputs to text.

=================  =================================================================================
``pipeline.py``    :class:`Pipeline` and ``pipeline()``: LMDeploy's API, glue over the parts below
``prompt.py``      prompt forms → messages → chat template → token ids with image blocks
``images.py``      images → tiles: loading under the media policy and deadline, the ``session_len``
                   check from sizes, content hashes, deferred tiles, the inline-source memo
``prepare.py``     :class:`Preparer`: a prompt + ``GenerationConfig`` → :class:`PreparedRequest`
                   (validated, tokenised, with sampling parameters), on two thread pools
``limits.py``      what a prompt may hold before any work: ``max_prompt_chars``, pieces, encodable
                   text (the server applies the same checks to request bodies)
``stream.py``      :class:`Streamer`: submission to the engine and streaming of its outputs
``output.py``      outputs → text: incremental detokenization, stop words, ``GenOut``, ``Response``
``stop_words.py``  stop strings on streamed text (the HTTP server matches its own with it too)
``tokenizer.py``   the checkpoint's tokenizer and the special ids resolved by name
=================  =================================================================================

The front end talks to the engine only through :class:`~vlmdeploy.engine.engine_loop.EngineLoop`
(add / abort / outputs by callback) with the plain, picklable data of :mod:`vlmdeploy.engine.io`.
"""
