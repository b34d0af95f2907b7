"""The web pages: the catalog, one page per model, and the playground (no API key, rate-limited).

Server-rendered Jinja2 templates, one CSS file and one small script. The playground's backend is
deliberately not under /v1 (which will require a key): `POST /playground/api/jobs` starts a job and
`GET /playground/api/jobs/{id}/events` streams its progress and result as Server-Sent Events.
Without JavaScript the same form posts to `POST /playground`, which waits and renders the result.
"""

from fluxport.web.render import STATIC_DIR
from fluxport.web.router import router

__all__ = ["STATIC_DIR", "router"]
