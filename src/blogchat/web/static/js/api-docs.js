// The interactive API docs: Swagger UI (loaded before this file) on the app's own OpenAPI
// document. A file rather than an inline script, so the page keeps the site's CSP.
const root = document.getElementById("swagger-ui");
window.ui = window.SwaggerUIBundle({
  url: root.dataset.openapiUrl,
  domNode: root,
  deepLinking: true,
});
