// A non-Python gRPC client: uses only proto/dpo/v1/dpo_service.proto (no generated code).
//
//   node tests/node/compute_loss.mjs 127.0.0.1:50051      (or DPO_GRPC_TARGET=...)
//
// Packages come from .ci/node (npm ci --prefix .ci/node); DPO_NODE_DIR overrides.
// Exits 0 when every check passes, 1 otherwise.
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "..", "..");
const nodeDir = process.env.DPO_NODE_DIR ?? path.join(root, ".ci", "node");
const require = createRequire(path.join(nodeDir, "package.json"));
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const target = process.argv[2] ?? process.env.DPO_GRPC_TARGET ?? "127.0.0.1:50051";
const definition = protoLoader.loadSync("dpo/v1/dpo_service.proto", {
  includeDirs: [path.join(root, "proto")],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const dpo = grpc.loadPackageDefinition(definition).dpo.v1;
const client = new dpo.DpoService(target, grpc.credentials.createInsecure());

const failures = [];
function check(ok, what) {
  if (!ok) failures.push(what);
}

function call(method, request) {
  const deadline = new Date(Date.now() + 30_000);
  return new Promise((resolve) => {
    client[method](request, { deadline }, (err, res) => resolve({ err, res }));
  });
}

const pairs = [
  { text: { prompt: "Q: 2+2?", chosen: " 4", rejected: " five, probably" } },
  { text: { prompt: "Say hi", chosen: "Hello!", rejected: "no" } },
  { tokens: { prompt_ids: [256, 72, 105], chosen_ids: [33, 257], rejected_ids: [63, 63, 257] } },
];

async function main() {
  const info = await call("GetModelInfo", {});
  check(!info.err, `GetModelInfo failed: ${info.err?.message}`);

  const { err, res } = await call("ComputeLoss", {
    pairs,
    beta: 0.2,
    loss_type: "LOSS_TYPE_SIGMOID",
    request_id: "node-client-1",
  });
  check(!err, `ComputeLoss failed: ${err?.message}`);
  if (res) {
    const mean = res.losses.reduce((a, b) => a + b, 0) / res.losses.length;
    check(res.losses.length === pairs.length, `losses has ${res.losses.length} entries`);
    check(
      Math.abs(res.loss - mean) <= 1e-6 * Math.max(1, Math.abs(mean)),
      `loss ${res.loss} != mean of per-pair losses ${mean}`,
    );
    check(Number.isFinite(res.loss) && res.loss > 0, `loss ${res.loss} not finite and positive`);
    check(res.beta === 0.2, `beta ${res.beta} != 0.2`);
    check(res.loss_type === "LOSS_TYPE_SIGMOID", `loss_type ${res.loss_type}`);
    check(res.request_id === "node-client-1", `request_id ${res.request_id}`);
    check(res.chosen_logps.every((x) => x < 0), "chosen log-probs must be negative");
    check(res.trained === false, "a loss-only call trained");
    if (info.res) {
      check(res.model_version === info.res.model_version, "model_version differs from GetModelInfo");
    }
  }

  // A bad token id is INVALID_ARGUMENT naming the field.
  const bad = await call("ComputeLoss", {
    pairs: [{ tokens: { prompt_ids: [1], chosen_ids: [2, 100000], rejected_ids: [3] } }],
  });
  check(bad.err?.code === grpc.status.INVALID_ARGUMENT, `bad id: status ${bad.err?.code}`);
  check(
    (bad.err?.details ?? "").includes("pairs[0].chosen_ids[1]"),
    `bad id: details ${bad.err?.details}`,
  );
  const code = bad.err?.metadata?.get("dpo-error-code")?.[0];
  check(code === "invalid_argument", `bad id: dpo-error-code ${code}`);

  client.close();
  console.log(JSON.stringify({ target, loss: res?.loss, losses: res?.losses, failures }));
  if (failures.length > 0) {
    for (const f of failures) console.error(`FAIL: ${f}`);
    process.exit(1);
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
