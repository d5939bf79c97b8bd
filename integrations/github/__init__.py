"""The GitHub App: issue and pull-request comments become sessions, and sessions end as pull requests.

* ``client``: app auth (JWT from the app id and private key) -> installation tokens through PyGithub,
  cached until shortly before they expire; or a personal access token as a labelled fallback.
* ``services.receive``: the webhook (signature on the raw body, delivery id deduplicated, triggers,
  the commenter's write permission checked through the API) -> ``sessions.bindings.start_or_follow_up``
  with the key ``github:<owner>/<repo>#<number>``.
* ``publish``: what the runner calls for a GitHub session: the git credentials (an ``http.extraHeader``
  in the git process's environment, never in ``.git/config`` or the sandbox) and, when a run completed
  with changes, the commit on the session's branch, the push and the pull request.
* ``senders`` / ``receivers``: reactions and comments back are deliveries of kind ``github``.
"""
