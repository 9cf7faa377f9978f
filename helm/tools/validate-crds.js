#!/usr/bin/env node
// Validate custom resources strictly: Prometheus Operator (ServiceMonitor, PrometheusRule) and Gateway API (GRPCRoute).
//
// Reads a JSON array of Kubernetes objects on stdin; prints one JSON object
// {"checked": N, "errors": ["<kind>/<name>: <path> <message>", ...]} and exits 1 when there
// are errors (including an object of a kind it does not know).
//
// Schemas: the npm packages @kubernetes-models/prometheus-operator and @kubernetes-models/gateway-api
// (ajv validators compiled from the projects' CRDs), installed by helm/tools/install.sh into <repo>/tools/node.
// Those validators do not reject unknown fields (the schemas carry no additionalProperties),
// so "strict" is added here: every object handed to the validator is wrapped in a Proxy that
// records which keys the validator looks at. The validator reads every property its schema
// declares (and iterates the keys of free-form maps), so a key it never touched is a key the
// schema does not know: a typo such as `intervall` or a field at the wrong level is an error.
//
// Knows nothing about Helm or the chart: the test renders the chart and pipes the objects here.

"use strict";
const { readFileSync } = require("node:fs");
const { join, resolve } = require("node:path");
const { pathToFileURL } = require("node:url");

const toolsDir = process.env.FLOWACT_TOOLS_DIR || resolve(__dirname, "..", "..", "tools");
const schemas = (pkg) => join(toolsDir, "node", "node_modules", "@kubernetes-models", pkg, "_schemas");
const PREFIX = "ComGithubPrometheusOperatorPrometheusOperatorPkgApisMonitoring";

// apiVersion/kind -> compiled schema module.
const KINDS = {
  "monitoring.coreos.com/v1/ServiceMonitor": join(schemas("prometheus-operator"), `${PREFIX}V1ServiceMonitor.js`),
  "monitoring.coreos.com/v1/PodMonitor": join(schemas("prometheus-operator"), `${PREFIX}V1PodMonitor.js`),
  "monitoring.coreos.com/v1/PrometheusRule": join(schemas("prometheus-operator"), `${PREFIX}V1PrometheusRule.js`),
  "gateway.networking.k8s.io/v1/GRPCRoute": join(schemas("gateway-api"), "IoK8sSigsGatewayApiApisV1GRPCRoute.js"),
};

// Wrap `value` (recursively, lazily) so that reads are recorded in `seen` as "path/key".
function track(value, path, seen) {
  if (value === null || typeof value !== "object") return value;
  return new Proxy(value, {
    get(target, key, receiver) {
      const v = Reflect.get(target, key, receiver);
      if (typeof key !== "string" || !Object.prototype.hasOwnProperty.call(target, key)) return v;
      const child = `${path}/${key}`;
      seen.add(child);
      return track(v, child, seen);
    },
    has(target, key) {
      if (typeof key === "string") seen.add(`${path}/${key}`);
      return Reflect.has(target, key);
    },
  });
}

// Every "path/key" present in the plain data.
function allPaths(value, path, out) {
  if (value === null || typeof value !== "object") return out;
  for (const [k, v] of Object.entries(value)) {
    const child = `${path}/${k}`;
    out.push(child);
    allPaths(v, child, out);
  }
  return out;
}

async function validateOne(obj) {
  const id = `${obj?.kind ?? "?"}/${obj?.metadata?.name ?? "?"}`;
  const file = KINDS[`${obj?.apiVersion}/${obj?.kind}`];
  if (!file) return [`${id}: no schema for apiVersion=${obj?.apiVersion} kind=${obj?.kind}`];
  const { validate } = await import(pathToFileURL(file).href);
  const seen = new Set();
  const ok = validate(track(obj, "", seen));
  const errors = ok ? [] : (validate.errors || []).map(
    (e) => `${id}: ${e.instancePath || "/"} ${e.keyword} ${JSON.stringify(e.params)}`);
  // Unknown fields: present in the data, never read by the validator. Report the outermost one.
  const unknown = allPaths(obj, "", []).filter((p) => !seen.has(p));
  for (const p of unknown) {
    if (!unknown.some((q) => q !== p && p.startsWith(`${q}/`))) errors.push(`${id}: ${p} unknown field`);
  }
  return errors;
}

async function main() {
  const docs = JSON.parse(readFileSync(0, "utf8"));
  if (!Array.isArray(docs)) {
    console.log(JSON.stringify({ checked: 0, errors: ["stdin: expected a JSON array of objects"] }));
    return 1;
  }
  const errors = [];
  for (const d of docs) errors.push(...(await validateOne(d)));
  console.log(JSON.stringify({ checked: docs.length, errors }, null, 1));
  return errors.length ? 1 : 0;
}

main().then((code) => process.exit(code), (err) => { console.error(err); process.exit(2); });
