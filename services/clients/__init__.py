"""Clients of a Parley cluster: the ``parley`` command, the gateway SDK and the subtitles command.

- :mod:`.cli`: the ``parley`` command (``python -m services.cli`` runs it too).
- :mod:`.cluster`: the five servers as local processes (``parley up``), and health checks.
- :mod:`.gateway_client`: :class:`~services.clients.gateway_client.GatewayClient`, the SDK of the gateway.
- :mod:`.subtitles_command`: ``parley subtitles INPUT``.
- :mod:`.media`: audio and video files to PCM (PyAV), and WAV writing.
- :mod:`.flags`: the TLS and token flags every command shares.

Nothing here is imported by a server.
"""
