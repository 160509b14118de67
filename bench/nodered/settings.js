// Node-RED settings for the bench: a headless runtime on loopback, the flow in flows.json, and
// the `pg` module given to function nodes the usual way (functionGlobalContext).
module.exports = {
    flowFile: "flows.json",
    uiHost: "127.0.0.1",
    uiPort: parseInt(process.env.NODERED_PORT || "1880", 10),
    disableEditor: true,
    credentialSecret: false,
    functionGlobalContext: { pg: require("pg") },
    logging: { console: { level: "info", metrics: false, audit: false } },
};
