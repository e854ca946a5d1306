"""Who may come in (issue 14): the checks a route's rules make of each request, decided where
`plan_request` plans it, for the HTTP path and the front door alike."""
