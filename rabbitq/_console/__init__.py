"""The rabbitq console (`rabbitq console`, from the `console` extra): a web page over the
operations the CLI calls. It reads with `_status` and `_parking` and acts with
`parking.replay` and `parking.purge`; it holds no logic of its own that the CLI does not share.
"""
