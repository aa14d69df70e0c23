"""The HTTP scorer's routes, one `APIRouter` per concern; `serving.app.create_app` wires them."""
